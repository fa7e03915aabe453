#!/usr/bin/env bash
# Packs the Debian packages the GPU machine lacks (gflags, glog, nlohmann-json, OpenBLAS and
# what they link) into .devdeps/ for a device run to carry (run here, where apt reaches the
# archive), with an env.sh that unpacks them under /opt/devdeps and points CMake and the
# loader at them. Usage: bash tools/pack_gpu_deps.sh; then on the GPU machine, with
# .devdeps carried: source .devdeps/env.sh && bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
rm -rf .devdeps && mkdir -p .devdeps
(cd .devdeps && apt-get download -q \
  libgflags-dev libgflags2.2 libgoogle-glog-dev libgoogle-glog0v6 libunwind-dev libunwind8 \
  nlohmann-json3-dev libopenblas-dev libopenblas0 libopenblas0-pthread libopenblas-pthread-dev \
  libgfortran5 >/dev/null)
cat > .devdeps/env.sh <<'ENV'
# source me on the GPU machine: unpacks the carried packages and exports search paths
_dd=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /opt/devdeps
for f in "$_dd"/*.deb; do dpkg -x "$f" /opt/devdeps; done
[ -e /usr/share/glog ] || ln -s /opt/devdeps/usr/share/glog /usr/share/glog  # glog's CMake files
_lib=/opt/devdeps/usr/lib/x86_64-linux-gnu
export CMAKE_PREFIX_PATH=/opt/devdeps/usr:$_lib/openblas-pthread${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
export LD_LIBRARY_PATH=$_lib:$_lib/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CPATH=/opt/devdeps/usr/include${CPATH:+:$CPATH}
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on the shared machines
ENV
du -sh .devdeps
