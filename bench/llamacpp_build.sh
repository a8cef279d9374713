#!/usr/bin/env bash
# Build llama.cpp (llama-bench, llama-quantize, llama-perplexity) from the source vendored in the
# llama-cpp-python sdist, cached under $CACHE (default .cache/llama.cpp): the sdist is downloaded once, the
# cmake build dir is reused, so a second run only checks the targets are up to date.
set -euo pipefail
PY=${PY:-.venv/bin/python}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${CACHE:-.cache/llama.cpp}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CACHE"
fi
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  tar xzf "$SDIST" -C "$CACHE"
fi
BUILD="$CACHE/build-$VERSION"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DBUILD_SHARED_LIBS=OFF > "$CACHE/cmake-configure.log"
fi
cmake --build "$BUILD" -j "$JOBS" --target llama-bench llama-quantize llama-perplexity
echo "$BUILD/bin"
