"""``python -m uringloop info``: what this kernel's io_uring can do and what the loop uses."""

from __future__ import annotations

import argparse
import platform
import sys

from . import UringEventLoop, UringUnavailableError, __version__, probe


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def info() -> int:
    print(f"uringloop {__version__} on Python {platform.python_version()}")
    print(f"kernel: {platform.system()} {platform.release()} ({platform.machine()})")
    try:
        features = probe()
    except UringUnavailableError as exc:
        print(f"io_uring: unavailable\n  {exc.strerror}")
        return 1
    except ValueError as exc:  # a bad URINGLOOP_EMULATE_KERNEL
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("io_uring: available")
    if features.emulated_kernel:
        print(
            f"emulating Linux {features.emulated_kernel} (URINGLOOP_EMULATE_KERNEL): "
            "what that release lacks is reported missing and left unused:"
        )
        kinds: dict[str, list[str]] = {}
        for item in features.hidden:
            kind, _, name = item.rpartition(" ")
            kinds.setdefault(kind or item, []).append(name if kind else "")
        for kind, names in kinds.items():
            print(f"  leaves out {kind}s: {' '.join(n for n in names if n)}".rstrip(": "))
    print("setup flags accepted by this kernel:")
    for name, ok in features.setup_flags.items():
        print(f"  {name:<14} {_yes(ok)}")
    print("ring features: " + " ".join(features.ring_features))
    print(f"opcodes supported ({len(features.opcodes)}):")
    names = sorted(features.opcodes)
    for i in range(0, len(names), 6):
        print("  " + " ".join(f"{n:<16}" for n in names[i : i + 6]).rstrip())
    print("request features (tried, not guessed):")
    print(f"  SEND_ZC                  {_yes(features.send_zc)}")
    print(f"  SEND_ZC usage reports    {_yes(features.send_zc_report_usage)}")
    print(f"  multishot accept         {_yes(features.multishot_accept)}")
    print(f"  multishot recv           {_yes(features.recv_multishot)}")
    print(f"  provided buffer rings    {_yes(features.provided_buffer_rings)}")
    print(f"  registered buffers       {_yes(features.registered_buffers)}")
    loop = UringEventLoop()
    try:
        ring = loop.ring_info()
    finally:
        loop.close()
    print("this loop's ring:")
    print(f"  set-up rung              {ring['setup']}")
    print(f"  flags                    {' '.join(ring['flags'])}")
    print(f"  SQ/CQ entries            {ring['sq_entries']}/{ring['cq_entries']}")
    if ring["refused"]:
        print(f"  refused with EINVAL      {', '.join(ring['refused'])}")
    restricted = "yes (only the opcodes, flags and registrations it uses)"
    print(f"  restricted               {restricted if ring['restricted'] else 'no'}")
    print("loop features in use:")
    print("  waiting for I/O          io_uring_enter (one per loop iteration)")
    print("  readiness (add_reader)   POLL_ADD on the ring, level-triggered")
    print("  sock_recv/sendall/...    RECV, SEND, ACCEPT on the ring; connect() polled")
    recv = (
        "multishot RECV from a buffer ring"
        if features.recv_multishot
        else "single-shot RECV (no multishot receive here)"
    )
    print(f"  stream transports        {recv}, batched SEND")
    if "RECVSEND_BUNDLE" in features.ring_features:
        # measured (README, "Receive and send bundles"): nothing to merge
        print(
            "  receive/send bundles     available, not used: a receive already takes one "
            "completion per message and a batched SEND one request per socket"
        )
    print(f"  datagram transports      {recv.replace('RECV', 'RECVMSG')}, SENDMSG")
    if features.send_zc and features.send_zc_report_usage:
        zc = "SEND_ZC for large writes"
    elif features.send_zc:
        zc = "no (SEND_ZC without usage reports, which came in 6.2: copied sends)"
    else:
        zc = "no (copied sends)"
    print(f"  zero-copy sends          {zc}")
    accept = "multishot ACCEPT" if features.multishot_accept else "ACCEPT, one per connection"
    print(f"  servers                  {accept}; sockets handed in: POLL + accept()")
    print("  sendfile                 SPLICE file -> pipe -> socket")
    print(
        "  forward                  splice(2) socket -> pipe -> socket in the loop thread, "
        "waits by POLL"
    )
    print("  child processes          POLL on a pidfd")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uringloop")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print kernel io_uring support and what the loop uses")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
