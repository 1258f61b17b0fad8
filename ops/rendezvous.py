"""The process group of a single-node run, with every socket it opens on the loopback interface.

torch's rendezvous store (TCPStore) listens on all interfaces, whatever MASTER_ADDR says, and answers
anyone who can reach the machine. When MASTER_ADDR is a loopback address (one process, or the deepspeed
launcher on one node) no other machine takes part, so the store's listening socket is bound here, to
127.0.0.1, and handed to the store; gloo and NCCL are told to use the loopback interface for theirs.
Multi-node runs (MASTER_ADDR another host) keep torch's defaults: see README, "Ports".
"""
from __future__ import annotations

import os
import socket

import torch

__all__ = ["is_loopback_master", "init_loopback_group"]


def is_loopback_master() -> bool:
    """Whether MASTER_ADDR names this machine's loopback interface (a single-node run)."""
    address = os.environ.get("MASTER_ADDR", "")
    return address == "localhost" or address == "::1" or address.startswith("127.")


def _loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def _listening_socket(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port (port 0: any free one, which MASTER_PORT then names)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def init_loopback_group(timeout) -> None:
    """init_process_group from RANK, WORLD_SIZE and MASTER_PORT, on a store bound to 127.0.0.1."""
    import torch.distributed as dist

    interface = _loopback_interface()
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    listener = _listening_socket(int(os.environ["MASTER_PORT"])) if rank == 0 else None
    if listener is not None:
        os.environ["MASTER_PORT"] = str(listener.getsockname()[1])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, is_master=rank == 0,
                          timeout=timeout, master_listen_fd=listener.detach() if listener else None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
