# cprd — build, test and demo. `make demo` and `make check` install what they
# need (Debian packages, QEMU from bookworm-backports) before they run.

CC      ?= gcc
B       := build
CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Wshadow \
           -Wmissing-prototypes -Wstrict-prototypes -D_GNU_SOURCE -I. -fstack-protector-strong
LDFLAGS ?=

# SANITIZE=1: AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer
# (`make asan` builds that with clang in $(B)/asan). clang, not gcc: gcc's
# UBSan runtime is a library apart from its ASan one and writes its reports to
# stderr whatever log_path says, where the tests would not see them.
# CPRD_SANITIZE lets the seccomp filter admit what the sanitizer runtime needs
# (daemon/host/sandbox.c). Warnings are the gcc build's to gate, not clang's.
SAN_FLAGS := -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
ifneq ($(SANITIZE),)
CFLAGS  += $(SAN_FLAGS) -DCPRD_SANITIZE -Wno-error
LDFLAGS += $(SAN_FLAGS)
endif

JSON_LIBS    := $(shell pkg-config --libs json-c 2>/dev/null || echo -ljson-c)
JSON_CFLAGS  := $(shell pkg-config --cflags json-c 2>/dev/null)
SD_LIBS      := $(shell pkg-config --libs libsystemd 2>/dev/null || echo -lsystemd)
SECCOMP_LIBS := $(shell pkg-config --libs libseccomp 2>/dev/null || echo -lseccomp)
CHECK_LIBS   := $(shell pkg-config --libs check 2>/dev/null || echo -lcheck)
EV_LIBS      := -lev
XXHASH_LIBS  := $(shell pkg-config --libs libxxhash 2>/dev/null || echo -lxxhash)
CFLAGS       += $(JSON_CFLAGS)

COMMON_OBJ   := $(patsubst %.c,$(B)/obj/%.o,$(wildcard common/*.c))
PROTO_OBJ    := $(patsubst %.c,$(B)/obj/%.o,$(wildcard proto/*.c))
KVM_OBJ      := $(patsubst %.c,$(B)/obj/%.o,$(wildcard kvm/*.c))
MEMSTORE_OBJ := $(patsubst %.c,$(B)/obj/%.o,$(wildcard memstore/*.c))
DAEMON_OBJ   := $(patsubst %.c,$(B)/obj/%.o,$(wildcard daemon/*.c daemon/*/*.c))
CLI_OBJ      := $(patsubst %.c,$(B)/obj/%.o,$(wildcard cli/*.c))
UNIT_TESTS   := $(patsubst tests/unit/%.c,$(B)/tests/%,$(wildcard tests/unit/test_*.c))
# Man pages are written in scdoc (man/NAME.SECTION.scd) and built into roff.
MAN_PAGES    := $(patsubst man/%.scd,$(B)/man/%,$(wildcard man/*.scd))

.PHONY: all asan deps check-deps guest check unit integration asan-integration demo bench fuzz \
	format format-check install clean units units-verify man man-check qemu-next bench-checkpoint \
	debian-guest debian-guest-smoke \
	FORCE
all: $(B)/cprd $(B)/cprctl $(MAN_PAGES)

man: $(MAN_PAGES)

$(B)/man/%: man/%.scd
	@mkdir -p $(dir $@)
	scdoc < $< > $@.tmp && mv $@.tmp $@

# The pages render through groff and man without a warning.
man-check: $(MAN_PAGES)
	@sh tests/check-man.sh $(MAN_PAGES)

$(B)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c -o $@ $<

$(B)/libcommon.a: $(COMMON_OBJ)
	$(AR) rcs $@ $^
$(B)/libproto.a: $(PROTO_OBJ)
	$(AR) rcs $@ $^
$(B)/libkvm.a: $(KVM_OBJ)
	$(AR) rcs $@ $^
$(B)/libmemstore.a: $(MEMSTORE_OBJ)
	$(AR) rcs $@ $^

$(B)/cprd: $(DAEMON_OBJ) $(B)/libkvm.a $(B)/libmemstore.a $(B)/libproto.a $(B)/libcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(JSON_LIBS) $(EV_LIBS) $(SD_LIBS) $(SECCOMP_LIBS) $(XXHASH_LIBS)

$(B)/cprctl: $(CLI_OBJ) $(B)/libproto.a
	$(CC) $(LDFLAGS) -o $@ $^ $(JSON_LIBS) -pthread

# A suite may test daemon code that, like the libraries, neither logs nor
# needs the event loop: it names those objects as extra prerequisites.
$(B)/tests/%: tests/unit/%.c $(B)/libkvm.a $(B)/libmemstore.a $(B)/libproto.a $(B)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(TEST_CFLAGS) -o $@ $(filter %.c %.o,$^) $(filter %.a,$^) $(CHECK_LIBS) \
		$(JSON_LIBS) $(TEST_LIBS)

$(B)/tests/test_registry: $(B)/obj/daemon/core/registry.o

# Suites with golden files (tests/unit/golden.h) are told where they are, so
# they find them from any directory; CPRD_REGEN_GOLDEN=1 make unit rewrites them.
GOLDEN_CFLAGS := -DGOLDEN_DIR='"$(CURDIR)/tests/unit/golden"'
DEVICE_OBJ := $(B)/obj/daemon/devices/devices.o $(B)/obj/daemon/devices/ram.o \
	$(B)/obj/daemon/devices/console.o $(B)/obj/daemon/devices/tap.o \
	$(B)/obj/daemon/devices/disk.o
$(B)/tests/test_vmrecord: $(B)/obj/daemon/core/vmrecord.o $(DEVICE_OBJ) tests/unit/golden.h
$(B)/tests/test_vmrecord: TEST_CFLAGS = $(GOLDEN_CFLAGS)
$(B)/tests/test_argv: $(DEVICE_OBJ) tests/unit/golden.h
$(B)/tests/test_argv: TEST_CFLAGS = $(GOLDEN_CFLAGS)

# Unit tests of daemon code that stands alone (no loop, no logging).
$(B)/tests/test_settle: $(B)/obj/daemon/ops/settle.o
$(B)/tests/test_limits: $(B)/obj/daemon/core/limits.o
# The device types, but not their custody (custody.c needs the daemon).
$(B)/tests/test_devices: $(DEVICE_OBJ)

# The launcher answers on an event loop.
$(B)/tests/test_launcher: $(B)/obj/daemon/host/launcher.o $(B)/obj/daemon/host/confine.o
$(B)/tests/test_launcher: TEST_LIBS = $(EV_LIBS)

# The update engine's suite runs the daemon itself, every object but
# main.o, on its own event loop: it links what cprd links.
$(B)/tests/test_update: $(filter-out $(B)/obj/daemon/main.o,$(DAEMON_OBJ))
$(B)/tests/test_update: TEST_LIBS = $(EV_LIBS) $(SD_LIBS) $(SECCOMP_LIBS) $(XXHASH_LIBS)

# The operations' tables: their types are defined beside the operations.
$(B)/tests/test_op: $(filter-out $(B)/obj/daemon/main.o,$(DAEMON_OBJ))
$(B)/tests/test_op: TEST_LIBS = $(EV_LIBS) $(SD_LIBS) $(SECCOMP_LIBS) $(XXHASH_LIBS)

# cprd and cprctl again, with ASan + UBSan (+ LSan), in $(B)/asan; installs
# clang and its sanitizer runtimes when they are missing.
ASAN_CC ?= clang
asan:
	@sh scripts/need-clang.sh $(B)/asan $(ASAN_CC) $(SAN_FLAGS)
	@$(MAKE) --no-print-directory B=$(B)/asan SANITIZE=1 CC=$(ASAN_CC) all

deps:
	@sh scripts/install-deps.sh

check-deps:
	@sh scripts/install-deps.sh --check

guest: deps
	@sh scripts/build-guest.sh $(B)/guest
	@sh scripts/accel-probe.sh $(B)/guest

# A second, newer QEMU for the cross-version tests, built from Debian's source
# package once into QEMU_NEXT_CACHE/qemu-VERSION (outside the clone) and
# reused (scripts/build-qemu-next.sh says how it is fetched and verified).
QEMU_NEXT_CACHE ?= /var/cache/cprd-test
export CPRD_QEMU_CACHE := $(QEMU_NEXT_CACHE)
qemu-next:
	@sh scripts/build-qemu-next.sh >/dev/null

# A real Debian bookworm guest disk for real-VM tests (firmware boot, disks,
# networking, the guest agent), built once into $(DEBIAN_GUEST) from Debian's
# packages (scripts/build-debian-guest.sh says what is inside). Not part of
# `make check`. debian-guest-smoke boots it with SeaBIOS and with OVMF under
# TCG and checks it (DEBIAN_GUEST_SMOKE_ARGS, e.g. "--firmware uefi --analyze 15").
DEBIAN_GUEST ?= $(QEMU_NEXT_CACHE)/debian-guest
debian-guest:
	@sh scripts/install-deps.sh --debian-guest
	@sh scripts/build-debian-guest.sh $(DEBIAN_GUEST) >/dev/null

debian-guest-smoke: deps debian-guest
	@python3 scripts/debian-guest-smoke.py $(DEBIAN_GUEST) $(DEBIAN_GUEST_SMOKE_ARGS)

unit: $(UNIT_TESTS)
	@sh tests/run-unit.sh $(UNIT_TESTS)

# The normal build's run keeps its state directories on a tmpfs (as /run/cprd
# is on an ordinary host), the ASan build's on a disk file system.
integration: all guest
	@python3 tests/integration/run.py --build $(B) --state-tmpfs

# The integration tests again, against the ASan build, on the same guest.
asan-integration: asan guest
	@python3 tests/integration/run.py --build $(B)/asan --guest $(B)/guest --label asan \
		--state-base /var/tmp

# format-check, the Check suites, the integration tests against the normal
# and the ASan build, a short fuzz run (tests/run-all.sh says which failed).
check: check-deps
	@$(MAKE) --no-print-directory all asan $(UNIT_TESTS)
	@$(MAKE) --no-print-directory guest qemu-next
	@MAKE="$(MAKE)" sh tests/run-all.sh $(B)

demo: deps
	@$(MAKE) --no-print-directory all guest
	@sh scripts/demo.sh $(B)

# libFuzzer over proto/ (tests/fuzz/fuzz_proto.c): builds with clang and runs
# for FUZZ_SECONDS on build/fuzz/corpus, seeded from tests/fuzz/corpus.
# Installs clang and the libFuzzer runtime when they are missing.
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
fuzz:
	@sh scripts/need-clang.sh $(B)/fuzz $(FUZZ_CC) -fsanitize=fuzzer
	@mkdir -p $(B)/fuzz/corpus
	$(FUZZ_CC) -g -O1 -std=gnu11 -D_GNU_SOURCE -I. -Wall -Wextra -Wno-unused-parameter \
		-fsanitize=fuzzer,address,undefined $(JSON_CFLAGS) \
		-o $(B)/fuzz/fuzz_proto tests/fuzz/fuzz_proto.c $(wildcard proto/*.c) $(JSON_LIBS)
	@for f in tests/fuzz/corpus/*; do \
		[ -e $(B)/fuzz/corpus/$${f##*/} ] || cp $$f $(B)/fuzz/corpus/ || exit 1; \
	done
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(B)/fuzz/fuzz_proto -max_len=8192 -max_total_time=$(FUZZ_SECONDS) -timeout=30 \
		-print_final_stats=1 -artifact_prefix=$(B)/fuzz/ $(B)/fuzz/corpus

bench: deps
	@$(MAKE) --no-print-directory all guest qemu-next
	@python3 bench/bench.py --build $(B)
	@python3 bench/bench_checkpoint.py --build $(B)
	@python3 bench/bench_versions.py --build $(B)

# Between Debian's QEMU and `make qemu-next`'s: handover both ways,
# cpr-transfer forward, cpr-exec, and QEMU's own cpr-transfer as baseline.
bench-versions: deps
	@$(MAKE) --no-print-directory all guest qemu-next
	@python3 bench/bench_versions.py --build $(B) $(BENCH_VERSIONS_ARGS)

# Checkpoint/restore only: sizes and more with BENCH_CHECKPOINT_ARGS, e.g.
# BENCH_CHECKPOINT_ARGS="--sizes 1G,4G --data-pct 25".
bench-checkpoint: deps
	@$(MAKE) --no-print-directory all guest
	@python3 bench/bench_checkpoint.py --build $(B) $(BENCH_CHECKPOINT_ARGS)

# Paths follow PREFIX; systemd looks for a package's units, sysusers and
# catalog files under /usr/lib and /usr/local/lib (UNITDIR etc. for others).
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
SBINDIR    ?= $(PREFIX)/sbin
DOCDIR     ?= $(PREFIX)/share/doc/cprd
UNITDIR    ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
CATALOGDIR ?= $(PREFIX)/lib/systemd/catalog

# The units, with this PREFIX's paths in them.
$(B)/units/cprd.service: units/cprd.service.in FORCE
	@mkdir -p $(dir $@)
	@sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
		$< >$@.tmp
	@if cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi
units: $(B)/units/cprd.service

# Lint of the unit files (systemd-analyze verify), part of make check.
units-verify: all
	@sh scripts/units-verify.sh $(B)

install: all units
	install -D -m 0755 $(B)/cprd $(DESTDIR)$(SBINDIR)/cprd
	install -D -m 0755 $(B)/cprctl $(DESTDIR)$(BINDIR)/cprctl
	install -D -m 0644 $(B)/units/cprd.service $(DESTDIR)$(UNITDIR)/cprd.service
	install -D -m 0644 units/cprd.socket $(DESTDIR)$(UNITDIR)/cprd.socket
	install -D -m 0644 units/cprd.sysusers $(DESTDIR)$(SYSUSERSDIR)/cprd.conf
	install -D -m 0644 units/cprd.catalog $(DESTDIR)$(CATALOGDIR)/cprd.catalog
	install -D -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -D -m 0644 $(B)/man/cprctl.1 $(DESTDIR)$(PREFIX)/share/man/man1/cprctl.1
	install -D -m 0644 $(B)/man/cprd.8 $(DESTDIR)$(PREFIX)/share/man/man8/cprd.8
	install -D -m 0644 completion/cprctl.bash \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/cprctl

FORCE:

format:
	clang-format -i $(wildcard */*.c */*.h daemon/*/*.c daemon/*/*.h)

format-check:
	clang-format --dry-run --Werror $(wildcard */*.c */*.h daemon/*/*.c daemon/*/*.h)

clean:
	rm -rf $(B)

-include $(shell find $(B)/obj -name '*.d' 2>/dev/null)
