# balloonctl: the two commands a newcomer needs are `make demo` and `make test`.
# Both work on a fresh Debian 12 or Debian 13 machine: what is missing is installed (apt-get as
# root). `make test-debian13` runs `make test` and `make demo` again inside a Debian 13 root
# (and `make test-debian12` inside a Debian 12 one), so one machine checks both stacks.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck unit fuzz-smoke bench bench-real system-deps clean lock \
	test-debian12 test-debian13

# Debian packages the tests need, each checked by the command or file that proves it present:
# the real-QEMU tests boot a guest built from Debian's kernel and busybox-static packages
# (apt-get download, no root needed for that), the libvirt tests start their own libvirtd,
# libvirt-python compiles against libvirt-dev, and the systemd unit is checked with
# systemd-analyze (verify, security --offline). zstd unpacks Debian 13's kernel (Python 3.13
# has no zstd module), and the unit's tests under a real systemd build a Debian 13 root with
# mmdebstrap and boot it with systemd-nspawn (systemd-container). The differential oracle
# against rust-vmm's virtio-queue (docs/differential-virtio-queue.md) builds with Debian's cargo
# against Debian's packaged crate, librust-virtio-queue-dev: installed where apt knows it
# (Debian 13; Debian 12 has no such package). Without apt lists (a fresh root) that is asked
# after apt-get update; with lists that lack it, the release has none and nothing is updated.
# The Prometheus rules in contrib/prometheus are checked and unit-tested with promtool: Debian
# 13 packages it alone (promtool 2.53), Debian 12 only with the server (prometheus 2.42); only
# the tool is wanted, so the Prometheus server that package enables on :9090 is disabled again.
# The remote-libvirt tests put a second libvirtd in a network namespace (iproute2) and make
# its TLS certificates at test time (openssl).
system-deps:
	@missing=""; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx depmod \
	  || missing="$$missing busybox-static"; \
	command -v libvirtd >/dev/null || missing="$$missing libvirt-daemon"; \
	[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] \
	  || missing="$$missing libvirt-daemon-driver-qemu"; \
	command -v virsh >/dev/null || missing="$$missing libvirt-clients"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	pkg-config --exists libvirt 2>/dev/null || missing="$$missing libvirt-dev"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v zstd >/dev/null || missing="$$missing zstd"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v promtool >/dev/null || { apt-cache show promtool >/dev/null 2>&1 \
	  && missing="$$missing promtool" || missing="$$missing prometheus"; }; \
	[ -e "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
	  || missing="$$missing python3-dev"; \
	oracle=""; \
	if ! ls -d /usr/share/cargo/registry/virtio-queue-0.14.* >/dev/null 2>&1 \
	  || ! [ -x /usr/bin/cargo ]; then \
	  if apt-cache show librust-virtio-queue-dev >/dev/null 2>&1; then \
	    missing="$$missing librust-virtio-queue-dev cargo"; \
	  elif ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then \
	    oracle="librust-virtio-queue-dev cargo"; \
	  fi; \
	fi; \
	if [ -n "$$missing$$oracle" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  $$SUDO apt-get update -q || exit 1; \
	  if [ -n "$$oracle" ] && apt-cache show librust-virtio-queue-dev >/dev/null 2>&1; then \
	    missing="$$missing $$oracle"; \
	  fi; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	      $$missing || exit 1; \
	    case " $$missing " in *" prometheus "*) \
	      $$SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true;; esac; \
	  fi; \
	fi

PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
# The venv is stamped with the Python that made it. One made by another Python (before an
# upgrade from Debian 12 to 13, say) is made anew: its packages sit in another
# lib/pythonX.Y while its bin/python follows the system's python3.
VENV_PY := $(VENV)/.python-$(PYVER)

$(VENV_PY): | system-deps
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	touch $@

# The test tools are locked, one constraints file per supported Python (requirements/), so a
# newcomer gets exactly what CI got; `make lock` regenerates them. balloonctl's own runtime
# dependencies keep ranges in pyproject.toml. Reinstall whenever either file changes.
LOCK_PYTHONS := 3.11 3.13
LOCK := requirements/test-py$(PYVER).txt

$(VENV)/.installed: pyproject.toml $(wildcard $(LOCK)) $(VENV_PY)
	@if [ -f $(LOCK) ]; then \
	  echo "$(BIN)/pip install -q -c $(LOCK) -e '.[test]'"; \
	  $(BIN)/pip install -q -c $(LOCK) -e '.[test]'; \
	else \
	  echo "warning: no lock for Python $(PYVER) (locked: $(LOCK_PYTHONS)); installing the newest" \
	    "releases, which CI has not tested" >&2; \
	  $(BIN)/pip install -q -e '.[test]'; \
	fi
	touch $@

# Regenerate requirements/test-pyX.Y.txt for every supported Python, from pyproject.toml's
# ranges, with uv's resolver (it resolves for a Python version it does not run on).
lock: $(VENV_PY)
	$(BIN)/pip install -q 'uv>=0.5'
	@for v in $(LOCK_PYTHONS); do \
	  $(BIN)/uv pip compile pyproject.toml --extra test --python-version $$v \
	    --python-platform x86_64-unknown-linux-gnu --annotation-style line \
	    --custom-compile-command 'make lock' --upgrade -q -o requirements/test-py$$v.txt \
	  || exit 1; \
	done

# Only the source folders that exist (git keeps no empty ones).
LINT_DIRS := $(wildcard balloonctl tests fuzz fixtures)

lint: $(VENV)/.installed
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test: lint typecheck unit fuzz-smoke

# A short campaign of every fuzz target (fuzz/fuzz_*.py), each FUZZ_SMOKE_TIME seconds on one
# core, from a fresh working corpus seeded from fixtures/corpus: fails on any finding (its
# file stays in $(FUZZ_SMOKE_DIR)/artifacts; `python -m fuzz reproduce FILE` shows it). It is
# `python -m fuzz bench`, so it also prints every target's exec/s against its goal (issue 17).
# Without any entry point it fails: a smoke run of nothing checks nothing. Then the same time of
# the differential against rust-vmm's virtio-queue (corpus replay, then random and mutated
# rings), where Debian packages the crate; elsewhere it says loudly that it did not run.
FUZZ_TARGETS    := $(patsubst fuzz/fuzz_%.py,%,$(wildcard fuzz/fuzz_*.py))
FUZZ_SMOKE_TIME ?= 15
FUZZ_SMOKE_DIR  ?= build/fuzz-smoke

fuzz-smoke: $(VENV)/.installed
	@test -n "$(FUZZ_TARGETS)" || { echo "fuzz-smoke: no fuzz/fuzz_*.py targets" >&2; exit 1; }
	rm -rf $(FUZZ_SMOKE_DIR)
	@failed=""; \
	$(BIN)/python -m fuzz bench --time $(FUZZ_SMOKE_TIME) --workdir $(FUZZ_SMOKE_DIR) \
	  || failed="$$failed fuzz-targets"; \
	if ls -d /usr/share/cargo/registry/virtio-queue-0.14.* >/dev/null 2>&1 \
	  || apt-cache show librust-virtio-queue-dev >/dev/null 2>&1; then \
	  $(BIN)/python -m fuzz differential --time $(FUZZ_SMOKE_TIME) \
	    --workdir $(FUZZ_SMOKE_DIR) || failed="$$failed differential"; \
	else \
	  echo "fuzz-smoke: differential against rust-vmm's virtio-queue NOT RUN: Debian does not" \
	    "package it for this release (librust-virtio-queue-dev); make test-debian13 runs it" >&2; \
	fi; \
	if [ -n "$$failed" ]; then echo "fuzz-smoke: findings or failures in:$$failed" >&2; exit 1; fi

# The tour on two simulated VMs behind real QMP sockets: no hypervisor needed.
demo: $(VENV)/.installed
	$(BIN)/balloonctl demo

bench: $(VENV)/.installed
	$(BIN)/balloonctl bench decode

# The auto-balloon daemon against BENCH_VMS simulated VMs (one sim process): tick latency and
# the daemon's CPU (goal: 1000 VMs, tick < 1 s, daemon < 20% of one core).
BENCH_VMS ?= 1000
.PHONY: bench-daemon
bench-daemon: $(VENV)/.installed
	$(BIN)/balloonctl bench daemon --vms $(BENCH_VMS)

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis

# The other stack: `make test` and `make demo` in a Debian root built from Debian's packages
# with mmdebstrap (cached in ~/.cache/balloonctl/roots; see fixtures/debian_root.py), the
# checkout copied in, entered with pivot_root with /proc, /sys, /dev and a private /tmp. Needs
# root.
test-debian13: DEBIAN_SUITE := trixie
test-debian12: DEBIAN_SUITE := bookworm
test-debian12 test-debian13:
	@command -v mmdebstrap >/dev/null || { \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	    mmdebstrap; }
	$(PYTHON) fixtures/debian_root.py run --suite $(DEBIAN_SUITE) -- sh -c 'make test && make demo'

# balloonctl set --wait on a real QEMU guest (booted from Debian packages) against a minimal
# raw QMP client: the ratio and the detection latency (issue 5's goal: within 1.10x).
bench-real: $(VENV)/.installed
	$(BIN)/python fixtures/guest.py run -- $(BIN)/balloonctl bench real --qmp {qmp} --observer {observer}
