# Everything here sets itself up on a fresh Debian/Ubuntu machine (root, or sudo-less
# containers): system packages first, then one virtualenv per interpreter.
#
#   make example     run the example echo server on uringloop
#   make test        the whole suite: Python 3.11 and 3.13, the native code under
#                    AddressSanitizer + UBSan, a subset of CPython's asyncio tests on
#                    uringloop, the ring tests as on Linux 5.19 (the I/O paths on 6.1) (CI)
#   make test-emulated  the ring tests under URINGLOOP_EMULATE_KERNEL=5.19, the I/O paths under 6.1
#   make compat      CPython's asyncio tests, asyncio vs uvloop vs uringloop, 3.11 and 3.12
#   make test-quick  the suite on one interpreter (PYTHON=...)
#   make fuzz        the stream-transport fuzzer on the sanitizer build (FUZZ_COUNT=...)
#   make bench       loop micro-benchmarks and echo, asyncio vs uvloop vs uringloop
#   make suites      aiohttp's own functional tests on asyncio's loop and on uringloop (tests/peer_suites.py)
#   make wheels      manylinux wheels (liburing linked in) for CPython 3.10-3.13 and the sdist, in dist/

# An interpreter of version $(1): pyenv's builds first, then PATH (shims that fail are skipped).
find_python = $(shell for p in $$(ls -d /root/.pyenv/versions/$(1)*/bin/python3 2>/dev/null) \
	$$(command -v python$(1)) $(2); do "$$p" -c 'import sys; assert sys.version_info[:2] == tuple(map(int, "$(1)".split(".")))' \
	2>/dev/null && { echo "$$p"; break; }; done)
PYTHON ?= $(call find_python,3.11,$$(command -v python3))
PY313 ?= $(call find_python,3.13)
PY312 ?= $(call find_python,3.12)
PY310 ?= $(call find_python,3.10)
PYTEST_ARGS ?=
APT_PACKAGES = liburing-dev strace wrk iproute2 curl postgresql redis-server

.PHONY: suites suites-ci wheels system-deps example test test-quick test-311 test-313 test-asan fuzz fuzz-ci compat compat-quick bench bench-quick lint clean

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# venv-<name>: PY=<interpreter>
.venv-%/ready: pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py) | system-deps
	@test -n "$(PY)" || { echo "no interpreter for $*: set PY=/path/to/python"; exit 1; }
	$(PY) -m venv .venv-$*
	.venv-$*/bin/pip install -q --upgrade pip
	.venv-$*/bin/pip install -q -e '.[test,bench]'
	touch $@

example: .venv-main/ready
	.venv-main/bin/python examples/echo_server.py

.venv-main/ready: PY = $(PYTHON)
.venv-313/ready: PY = $(PY313)
.venv-312/ready: PY = $(PY312)
.venv-310/ready: PY = $(PY310)

# aiohttp's own functional tests (its sdist, the version in .venv-main, their files untouched)
# with a uringloop choice added to their loop fixture (tests/peer_suites_plugin.py), beside the
# same run on asyncio's loop; fails on a test only uringloop fails that
# tests/peer_suites_known.md does not list. suites-ci: CI's slice (about two minutes).
# Then uvloop's own tests, its classes with asyncio's expectations, on asyncio's loop and on
# uringloop (tests/uvloop_suite.py, about two minutes).
suites: .venv-main/ready
	.venv-main/bin/python tests/peer_suites.py
	.venv-main/bin/python tests/uvloop_suite.py

suites-ci: .venv-main/ready
	.venv-main/bin/python tests/peer_suites.py --slice --reference-when-failing

# Wheels for every supported CPython found here (pyenv's builds or PATH), liburing linked
# in and checked by auditwheel, then the sdist (native/wheels.py says why static).
WHEEL_PYTHONS = $(PY310) $(PYTHON) $(PY312) $(PY313)
wheels: .venv-main/ready
	rm -rf dist
	.venv-main/bin/python native/wheels.py --out dist $(foreach p,$(WHEEL_PYTHONS),--python $(p))

test-quick: .venv-main/ready
	.venv-main/bin/python -m pytest $(PYTEST_ARGS)

test-311: test-quick

# 3.13 runs the files whose outcome can depend on the interpreter's asyncio; what tests the
# kernel, the ring's limits, packaging, external clients and the benchmarks (and the 4 GiB
# transfers) runs on 3.11 only, to keep CI near 15 minutes.
ONLY_ON_311 = test_bench.py test_wheel.py test_ring.py test_restricted_ring.py \
	test_emulated_kernels.py test_resource_limits.py test_client_postgres.py test_client_redis.py \
	test_churn.py test_quic.py test_examples.py
test-313: .venv-313/ready
	.venv-313/bin/python -m pytest $(foreach f,$(ONLY_ON_311),--ignore tests/$(f)) \
		-k "not four_gib" $(PYTEST_ARGS)

# The native parts rebuilt with AddressSanitizer and UBSan, and with fault injection
# compiled in (URINGLOOP_FAULTS: see tests/fuzz_streams.py), installed (not editable)
# into their own venv, running the tests that drive them, then a slice of the stream
# fuzzer. PYTHONMALLOC=malloc lets ASan see Python's own allocations too.
ASAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1 \
	-DUL_FAULT_INJECTION
ASAN_RUN = LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:verify_asan_link_order=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 URINGLOOP_EXPECT_SANITIZERS=1
.venv-asan/ready: pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py uringloop/*.py) | system-deps
	rm -rf build .venv-asan
	$(PYTHON) -m venv .venv-asan
	.venv-asan/bin/pip install -q --upgrade pip
	.venv-asan/bin/pip install -q 'pytest>=8' 'pytest-asyncio>=1.5' uvloop cffi 'setuptools>=77' wheel
	URINGLOOP_CFLAGS="$(ASAN_FLAGS)" URINGLOOP_LDFLAGS="-fsanitize=address,undefined" \
		.venv-asan/bin/pip install -q --no-build-isolation --no-cache-dir .
	rm -rf build
	touch $@

# The tests that drive the ring (uringloop's cases of them: -k UL_CASES).
RING_TESTS = test_ring.py test_sock_api.py test_loop_api.py test_entrypoints.py test_transports.py \
	test_servers.py test_zerocopy_buffers.py test_sendfile.py test_processes.py \
	test_datagram.py test_datagram_ring.py test_tls.py test_loop_close.py test_protocol_switch.py \
	test_reentrancy.py test_contextvars.py test_fuzz_findings.py test_scheduler.py \
	test_restricted_ring.py
UL_CASES = uringloop or not (asyncio or uvloop)

test-asan: .venv-asan/ready
	cd tests && $(ASAN_RUN) ../.venv-asan/bin/python -m pytest -p no:cacheprovider \
		-k "$(UL_CASES)" $(RING_TESTS)
	cd tests && $(ASAN_RUN) ../.venv-asan/bin/python -m pytest -p no:cacheprovider -q test_forward.py
	$(MAKE) fuzz-ci

# The same tests as the loop runs them on older kernels: URINGLOOP_EMULATE_KERNEL hides
# from the probe and the set-up ladder what those releases lack (uringloop/_ring.py).
# 5.19: COOP_TASKRUN, single-shot receives, copied sends: every ring test. 6.1:
# DEFER_TASKRUN, multishot receives, still copied sends (SEND_ZC usage reports came in
# 6.2): what differs from both 5.19 and this kernel is the streams' and datagrams'
# receive and send paths, so only their files (CI time).
EMULATED_61_TESTS = test_transports.py test_datagram_ring.py test_zerocopy_buffers.py \
	test_fuzz_findings.py test_reentrancy.py test_protocol_switch.py test_loop_close.py
test-emulated: .venv-main/ready
	cd tests && echo "== the ring tests as on Linux 5.19" && \
		URINGLOOP_EMULATE_KERNEL=5.19 ../.venv-main/bin/python -m pytest -p no:cacheprovider -q \
			-k "$(UL_CASES)" $(RING_TESTS) test_forward.py
	cd tests && echo "== the receive and send paths as on Linux 6.1" && \
		URINGLOOP_EMULATE_KERNEL=6.1 ../.venv-main/bin/python -m pytest -p no:cacheprovider -q \
			-k "$(UL_CASES)" $(EMULATED_61_TESTS)

# The stream fuzzer (tests/fuzz_streams.py) on the sanitizer build. fuzz-ci is CI's
# slice: a fixed seed, a fresh random seed (printed, with a replay command on failure)
# and a run with SQE allocation, submission and table growth failing now and then.
# `make fuzz FUZZ_COUNT=20000 [FUZZ_SEED=n] [FUZZ_FAULTS=sqe=7,submit=11,alloc=13]`
# runs as long a session as wanted; FUZZ_ONLY=i replays scenario i of FUZZ_SEED.
FUZZ_SEED ?=
FUZZ_COUNT ?= 2000
FUZZ_FAULTS ?=
FUZZ_ONLY ?=
FUZZ_CI_COUNT ?= 300
FUZZ_CI_FAULTS = sqe=29,submit=31,alloc=7
fuzz: .venv-asan/ready
	$(ASAN_RUN) $(if $(FUZZ_FAULTS),URINGLOOP_FAULTS=$(FUZZ_FAULTS)) .venv-asan/bin/python \
		tests/fuzz_streams.py $(if $(FUZZ_SEED),--seed $(FUZZ_SEED)) --keep-going \
		$(if $(FUZZ_ONLY),--only $(FUZZ_ONLY),--count $(FUZZ_COUNT))

fuzz-ci: .venv-asan/ready
	$(ASAN_RUN) .venv-asan/bin/python tests/fuzz_streams.py --seed 1 --count $(FUZZ_CI_COUNT)
	$(ASAN_RUN) .venv-asan/bin/python tests/fuzz_streams.py --count $(FUZZ_CI_COUNT)
	$(ASAN_RUN) URINGLOOP_FAULTS=$(FUZZ_CI_FAULTS) .venv-asan/bin/python tests/fuzz_streams.py \
		--seed 2 --count $$(( $(FUZZ_CI_COUNT) / 2 ))

# CPython's own asyncio tests with the policy set to each loop (tests/cpython_compat.py).
# compat: every loop-level module named in tests/cpython_compat.md, asyncio vs uvloop vs
# uringloop, under 3.11 and 3.12 (about 25 minutes). compat-quick: a stable subset on
# uringloop that fails on any failure not listed in tests/cpython_compat.md (CI).
COMPAT_OUT ?= build/compat
COMPAT_QUICK_MODULES = test_streams test_server test_sock_lowlevel test_sendfile test_events \
	test_subprocess test_ssl test_sslproto test_unix_events test_taskgroups test_timeouts
compat: .venv-main/ready .venv-312/ready
	mkdir -p $(COMPAT_OUT)
	for v in main 312; do \
		.venv-$$v/bin/python tests/cpython_compat.py --retarget --loop asyncio --loop uvloop \
			--loop uringloop --json $(COMPAT_OUT)/$$v.json --markdown $(COMPAT_OUT)/$$v.md \
			|| exit 1; \
	done

compat-quick: .venv-main/ready
	.venv-main/bin/python tests/cpython_compat.py --retarget --loop uringloop \
		--modules $(COMPAT_QUICK_MODULES) --expect-pass --known-failures tests/cpython_compat.md

test: test-311 test-313 test-asan compat-quick test-emulated suites-ci

bench: .venv-main/ready
	.venv-main/bin/python -m bench

bench-quick: .venv-main/ready
	.venv-main/bin/python -m bench --quick

lint: .venv-main/ready
	.venv-main/bin/pip install -q ruff
	.venv-main/bin/ruff check uringloop tests bench examples native
	.venv-main/bin/ruff format --check uringloop tests bench examples native

clean:
	rm -rf build dist .venv-* uringloop/*.so uringloop/_uring.c *.egg-info
