// `difftron prepare`: text (files, folders, stdin; .gz decompressed) or already-tokenised
// files -> a token dataset OUT/{train,val} of HDF5 shards (docs/DATA.md). Progress with
// rate and ETA goes to stderr; the summary to stdout.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

#include <gflags/gflags.h>

#include "io/prepare.h"
#include "launch/command.h"

DEFINE_string(input, "", "prepare: comma-separated files and folders (recursive) to read, or - for stdin");
DEFINE_string(out, "", "prepare: output dataset folder (creates OUT/train and OUT/val); plot: the PNG to write");
DEFINE_string(tokenizer, "", "prepare: 'bytes' (default for text) or a Hugging Face tokenizer.json (byte-level BPE)");
DEFINE_string(eos_token, "", "prepare: EOS token of a tokenizer.json when it is not a conventional one");
DEFINE_string(input_format, "auto", "prepare: auto, text, llmc, megatron, npy, raw16 or raw32");
DEFINE_string(extensions, "txt,rst,md", "prepare: text files taken from folders (each also as .gz)");
DEFINE_int64(shard_tokens, 100000000, "prepare: tokens per shard, 1 to 2^40");
DEFINE_int64(chunk_tokens, 1 << 20, "prepare: HDF5 chunk size in tokens, 1 to 2^28");
DEFINE_double(val_fraction, 0.01, "prepare: fraction of documents for OUT/val (0 = none)");
DEFINE_int32(jobs, 0, "prepare: tokeniser threads, 0 to 1024 (0 = all cores)");
// Shared with `convert` (gflags names are global).
DEFINE_bool(overwrite, false, "prepare: replace an existing --out, only one that prepare wrote (never / , $HOME, "
            "an input or a folder holding one); convert: let --to_hf replace config.json and model.safetensors "
            "in a non-empty folder");
DEFINE_bool(dedup, true, "prepare: skip input files whose content was already seen");
DEFINE_string(doc_separator, "", "prepare: split text into documents at this string (\\n escapes allowed); "
              "default: one document per file");
DEFINE_int64(import_vocab_size, 0, "prepare: vocabulary of imported token files (0 = from the format or --tokenizer)");
DEFINE_int64(import_eos_id, -2, "prepare: EOS id of imported token files (-2 = from the format or --tokenizer, -1 = none)");
DEFINE_bool(progress, true, "prepare: progress lines on stderr");

namespace {

std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[++i];
      out.push_back(c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c);
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char b[32];
  std::snprintf(b, sizeof b, "%d:%02d:%02d", int(s / 3600), int(std::fmod(s, 3600) / 60), int(std::fmod(s, 60)));
  return b;
}

std::string human(double v) {
  char b[32];
  if (v >= 1e9) std::snprintf(b, sizeof b, "%.2fG", v / 1e9);
  else if (v >= 1e6) std::snprintf(b, sizeof b, "%.2fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(b, sizeof b, "%.1fk", v / 1e3);
  else std::snprintf(b, sizeof b, "%.0f", v);
  return b;
}

int prepare_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc > 1) {
    std::cerr << "difftron prepare: unexpected argument '" << argv[1] << "' (use --input=...)\n";
    return 2;
  }
  difftron::PrepareOptions o;
  o.inputs = difftron::split_flag_list(FLAGS_input);
  o.out = FLAGS_out;
  o.tokenizer = FLAGS_tokenizer;
  o.eos_token = FLAGS_eos_token;
  o.format = FLAGS_input_format;
  o.extensions = difftron::split_flag_list(FLAGS_extensions);
  o.shard_tokens = FLAGS_shard_tokens;
  o.chunk_tokens = FLAGS_chunk_tokens;
  o.val_fraction = FLAGS_val_fraction;
  o.threads = FLAGS_jobs;
  o.overwrite = FLAGS_overwrite;
  o.dedup = FLAGS_dedup;
  o.doc_separator = unescape(FLAGS_doc_separator);
  o.import_vocab_size = FLAGS_import_vocab_size;
  o.import_eos_id = FLAGS_import_eos_id;
  const bool tty = ::isatty(2);
  double last_line = -1;
  if (FLAGS_progress) {
    o.on_progress = [&](const difftron::PrepareProgress& p) {
      if (!tty && p.seconds - last_line < 5 && p.files_done < p.files_total) return;
      last_line = p.seconds;
      const double mbps = p.seconds > 0 ? p.text_bytes / 1e6 / p.seconds : 0;
      const double tps = p.seconds > 0 ? p.tokens / p.seconds : 0;
      std::ostringstream os;
      os << "prepare: " << p.files_done << "/" << p.files_total << " files, " << human(double(p.bytes_done)) << "B";
      if (p.bytes_total > 0) {
        char pct[16];
        std::snprintf(pct, sizeof pct, "%.1f%%", 100.0 * double(p.bytes_done) / double(p.bytes_total));
        os << "/" << human(double(p.bytes_total)) << "B (" << pct << ")";
      }
      char rate[64];
      std::snprintf(rate, sizeof rate, "%.1f MB/s of text", mbps);
      os << ", " << human(double(p.tokens)) << " tokens, " << rate << ", " << human(tps) << " tok/s";
      if (p.bytes_total > 0 && p.bytes_done > 0)
        os << ", ETA " << hms(p.seconds * double(p.bytes_total - p.bytes_done) / double(p.bytes_done));
      os << ", elapsed " << hms(p.seconds);
      std::cerr << (tty ? "\r" : "") << os.str() << (tty ? "\033[K" : "\n") << std::flush;
    };
  }
  difftron::PrepareReport r = difftron::prepare_dataset(o);
  if (FLAGS_progress && tty) std::cerr << "\n";
  std::printf("prepared %s -> %s in %.1f s (%s bytes of input, %.1f MB/s, %s tokens/s)\n", r.format.c_str(),
              o.out.c_str(), r.seconds, human(double(r.bytes_read)).c_str(), r.bytes_read / 1e6 / r.seconds,
              human(double(r.train.tokens + r.val.tokens) / r.seconds).c_str());
  std::printf("  vocab %lld, eos %lld; files read %lld; skipped: %lld by extension, %lld binary, %lld duplicate, "
              "%lld empty documents\n",
              (long long)r.vocab_size, (long long)r.eos_id, (long long)r.files_read, (long long)r.skipped_extension,
              (long long)r.skipped_binary, (long long)r.skipped_duplicate, (long long)r.skipped_empty);
  std::printf("  train: %lld documents, %lld tokens, %lld shard(s) in %s/train\n", (long long)r.train.documents,
              (long long)r.train.tokens, (long long)r.train.shards, o.out.c_str());
  if (o.val_fraction > 0)
    std::printf("  val:   %lld documents, %lld tokens, %lld shard(s) in %s/val\n", (long long)r.val.documents,
                (long long)r.val.tokens, (long long)r.val.shards, o.out.c_str());
  std::printf("next: difftron inspect %s/train; difftron train --data=%s/train --val_data=%s/val ...\n",
              o.out.c_str(), o.out.c_str(), o.out.c_str());
  return 0;
}

}  // namespace

DIFFTRON_COMMAND("prepare", "text or token files -> HDF5 token shards (train/val)", prepare_main);
