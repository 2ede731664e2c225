# Sourced by the GPU machine's scripts (gpu.sh, gpu_eagle.sh) once they have set WORK and RESULTS:
# the compilers, the git sha of a `git archive` copy, timed stage lines, and the line every run's
# log ends with.
# The image's default g++ builds AOTInductor libraries that segfault at load (see DEVICE.md).
export CXX=/usr/bin/g++ CC=/usr/bin/gcc PYTHONUNBUFFERED=1
# A `git archive` copy (.trees/NAME, as the notes prepare them) has no .git: its GIT_SHA file says which commit.
[[ -z ${LLAMA_AOT_GIT_SHA:-} && -f GIT_SHA ]] && export LLAMA_AOT_GIT_SHA=$(cat GIT_SHA)
t0=$(date +%s)
stage() { echo "=== $1 (+$(( $(date +%s) - t0 )) s)"; }
trap 'status=$?; echo "=== done (+$(( $(date +%s) - t0 )) s, exit $status)"' EXIT
mkdir -p "$WORK" "$RESULTS"
