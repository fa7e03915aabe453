// `difftron <command> --help` as a user reads it: exit 0; the flags defined in the command's
// own file and those it declares from other files (read here from the sources: the
// DIFFTRON_COMMAND, DEFINE_ and DECLARE_ lines of launch/ and tools/), no others; defaults
// as one types them; `--helpfull` lists every flag. Help texts and plan output name only
// documents that are in the repository.
#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;
using difftron::testing::read_text_file;
using Result = difftron::testing::CommandResult;
Result run(const std::string& args) { return difftron::testing::run_difftron(args); }

// What one source file registers and which flags it defines and declares.
struct SourceFile {
  std::string path;  // relative to the repository
  std::vector<std::string> commands;
  std::set<std::string> defined, declared;
  bool loads_models = false;  // includes tools/inference.h: reads generate's --device, --checkpoint, --from_hf
};

std::vector<std::string> matches(const std::string& text, const std::string& pattern) {
  std::vector<std::string> out;
  const std::regex re(pattern);
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back((*it)[1].str());
  return out;
}

const std::vector<SourceFile>& program_sources() {
  static const std::vector<SourceFile> files = [] {
    std::vector<SourceFile> out;
    for (const char* dir : {"launch", "tools"})
      for (const auto& e : fs::directory_iterator(fs::path(DIFFTRON_SOURCE_DIR) / dir)) {
        if (e.path().extension() != ".cpp") continue;
        const std::string text = read_text_file(e.path());
        SourceFile f;
        f.path = std::string(dir) + "/" + e.path().filename().string();
        f.commands = matches(text, R"re(DIFFTRON_COMMAND\(\s*"([^"]+)")re");
        for (const auto& n : matches(text, R"(\bDEFINE_(?:bool|int32|int64|uint64|double|string)\(\s*(\w+))"))
          f.defined.insert(n);
        for (const auto& n : matches(text, R"(\bDECLARE_(?:bool|int32|int64|uint64|double|string)\(\s*(\w+))"))
          f.declared.insert(n);
        f.loads_models = text.find("#include \"tools/inference.h\"") != std::string::npos;
        out.push_back(f);
      }
    return out;
  }();
  return files;
}

// The flags a help text lists: lines "  --name=default ...".
std::set<std::string> listed_flags(const std::string& help) {
  std::set<std::string> out;
  const std::regex re(R"(^  --(\w+)=)");
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, re)) out.insert(m[1].str());
  }
  return out;
}

std::string joined(const std::set<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

TEST(CliHelp, SourcesAreFound) {
  std::set<std::string> commands;
  for (const auto& f : program_sources()) commands.insert(f.commands.begin(), f.commands.end());
  for (const char* c : {"train", "prepare", "plan", "generate", "convert", "eval"})
    EXPECT_TRUE(commands.count(c)) << c << " not found among the DIFFTRON_COMMAND lines of launch/ and tools/";
}

// Every command: --help exits 0 and lists exactly its file's flags and the flags it declares.
TEST(CliHelp, EachCommandListsItsOwnFlagsOnly) {
  int checked = 0;
  for (const auto& f : program_sources())
    for (const auto& command : f.commands) {
      SCOPED_TRACE(command + " (" + f.path + ")");
      const Result r = run(command + " --help");
      EXPECT_EQ(r.status, 0) << r.output;
      EXPECT_NE(r.output.find("usage: difftron " + command), std::string::npos) << r.output;
      std::set<std::string> expected = f.defined;
      expected.insert(f.declared.begin(), f.declared.end());
      if (f.loads_models) expected.insert({"device", "checkpoint", "from_hf"});
      const std::set<std::string> listed = listed_flags(r.output);
      std::set<std::string> missing, foreign;
      for (const auto& n : expected)
        if (!listed.count(n)) missing.insert(n);
      for (const auto& n : listed)
        if (!expected.count(n)) foreign.insert(n);
      EXPECT_TRUE(missing.empty()) << "not listed: " << joined(missing) << "\n" << r.output;
      EXPECT_TRUE(foreign.empty()) << "listed but not the command's: " << joined(foreign) << "\n" << r.output;
      ++checked;
    }
  EXPECT_GE(checked, 6);
}

TEST(CliHelp, TrainIsGroupedWithReadableDefaults) {
  const Result r = run("train --help");
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* heading : {"\nmodel:\n", "\noptimizer and schedule:\n", "\ncheckpoint:\n", "\nparallel"})
    EXPECT_NE(r.output.find(heading), std::string::npos) << heading << "\n" << r.output;
  // model flags before the optimizer's, the optimizer's before the checkpoint's
  EXPECT_LT(r.output.find("--d_model="), r.output.find("--beta1="));
  EXPECT_LT(r.output.find("--beta1="), r.output.find("--ckpt_dir="));
  // gflags writes doubles with 17 digits (0.90000000000000002) and integers as 6e+02
  for (const char* shown : {"--beta1=0.9 ", "--lr=0.001 ", "--collective_timeout=600 ", "--d_model=128 ",
                            "--attention=diff ", "--ckpt_dir=\"\" ", "--resume=true "})
    EXPECT_NE(r.output.find(shown), std::string::npos) << shown << "\n" << r.output;
  EXPECT_FALSE(std::regex_search(r.output, std::regex(R"(=-?[0-9]*\.[0-9]{6,})"))) << r.output;
  EXPECT_FALSE(std::regex_search(r.output, std::regex(R"(=[0-9.]+e\+)"))) << r.output;
  // glog's and other commands' flags stay behind --helpfull
  for (const char* other : {"--logtostderr=", "--minloglevel=", "--preset=", "--input=", "--bench_reps="})
    EXPECT_EQ(r.output.find(other), std::string::npos) << other << "\n" << r.output;
  EXPECT_NE(r.output.find("--helpfull"), std::string::npos) << r.output;
}

TEST(CliHelp, OtherSpellingsShowTheSameHelp) {
  const std::string help = run("plan --help").output;
  EXPECT_EQ(run("plan -h").output, help);
  EXPECT_EQ(run("help plan").output, help);
  EXPECT_EQ(run("train --helpon=plan").output, help);
  // --help wins wherever it stands, and nothing runs
  const Result r = run("plan --tp=3 --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.output, help);
  // the plan needs train's model and grid flags
  for (const char* flag : {"--tp=1 ", "--dp=1 ", "--seq=64 ", "--n_heads=2 ", "--preset=\"\" "})
    EXPECT_NE(help.find(flag), std::string::npos) << flag << "\n" << help;
}

TEST(CliHelp, HelpfullListsEveryFlag) {
  const Result r = run("prepare --helpfull");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(run("--helpfull").output, r.output);
  const std::set<std::string> listed = listed_flags(r.output);
  std::set<std::string> missing;
  for (const auto& f : program_sources())
    for (const auto& n : f.defined)
      if (!listed.count(n)) missing.insert(n);
  EXPECT_TRUE(missing.empty()) << "not in --helpfull: " << joined(missing);
  for (const char* library : {"logtostderr", "minloglevel", "v", "flagfile"})
    EXPECT_TRUE(listed.count(library)) << library;
  EXPECT_NE(r.output.find("launch/train.cpp (difftron train):"), std::string::npos) << r.output;
}

// Every `*.md` a help text or the plan names is in the repository (as named, or under docs/).
TEST(CliHelp, NamedDocumentsExist) {
  const std::string text = run("--helpfull").output + run("plan --preset=1.4B --tp=8 --dp=16 --seq=2048").output +
                           run("help").output;
  const std::regex md(R"([A-Za-z0-9_./-]*[A-Za-z0-9_]\.md\b)");
  int named = 0;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), md); it != std::sregex_iterator(); ++it) {
    const std::string doc = it->str();
    const fs::path root(DIFFTRON_SOURCE_DIR);
    EXPECT_TRUE(fs::exists(root / doc) || fs::exists(root / "docs" / doc)) << doc << " is not in the repository";
    ++named;
  }
  EXPECT_GT(named, 0) << "the help texts name docs/MODEL.md and docs/PERFORMANCE.md";
}

}  // namespace
