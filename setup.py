"""Build both native parts against liburing: the system's shared library, or its archive for wheels.

`uringloop._uring` is the cffi (API mode) binding used for the control plane;
`uringloop._dataplane` is the CPython C-API extension that owns the per-event path.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "native"))

from build_uring import LIBURING, check_liburing, dataplane_compile_args  # noqa: E402
from setuptools import Extension, setup  # noqa: E402

check_liburing()

setup(
    cffi_modules=["native/build_uring.py:ffibuilder"],
    ext_modules=[
        Extension(
            "uringloop._dataplane",
            sources=[
                "native/module.c",
                "native/ring.c",
                "native/requests.c",
                "native/stream.c",
                "native/stream_send.c",
                "native/stream_recv.c",
                "native/datagram.c",
                "native/zcbuf.c",
                "native/sched.c",
                "native/forward.c",
                "native/bufpool.c",
            ],
            depends=["native/dataplane.h", "native/bufpool.h", "native/compat.h"],
            libraries=LIBURING["libraries"],
            extra_objects=LIBURING["extra_objects"],
            extra_compile_args=dataplane_compile_args(),
            extra_link_args=LIBURING["extra_link_args"]
            + os.environ.get("URINGLOOP_LDFLAGS", "").split(),
        )
    ],
)
