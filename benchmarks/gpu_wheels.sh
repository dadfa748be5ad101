# Sourced by the device scripts (gpu_session.sh, gpu_quality.sh): install the wheels carried in
# .whl/ (no index: the device machine reaches no network) into /tmp/site and put it on PYTHONPATH.
# A wheel whose module already imports is left alone when its name is given: install_wheels gguf.
install_wheels() {
  ls .whl/*.whl > /dev/null 2>&1 || return 0
  if [ -n "${1:-}" ] && python3 -c "import $1" 2> /dev/null; then
    return 0
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
}
