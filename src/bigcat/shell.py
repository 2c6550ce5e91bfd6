"""``bigcat open``: an interactive Python shell with datasets and a Dask client ready."""

from __future__ import annotations

import code
import os
import sys
from collections.abc import Sequence
from typing import Any

from bigcat.cluster import connect
from bigcat.dataset import open_dataset

__all__ = ["open_shell"]


def _banner(namespace: dict[str, Any], names: list[str], client: Any) -> str:
    lines = ["bigcat shell — variables ready:"]
    for name in names:
        lines.append(
            f"\n{name} = bigcat.open_dataset({namespace[name].attrs.get('source', '')!r})"
            if hasattr(namespace[name], "attrs")
            else f"\n{name}:"
        )
        lines.append(repr(namespace[name]))
    if client is not None:
        lines.append(f"\nclient = {client!r}")
        lines.append(f"Dask dashboard: {client.dashboard_link}")
    lines.append("\nAlso imported: bigcat, numpy as np, pandas as pd, xarray as xr, dask. Exit with Ctrl-D.")
    return "\n".join(lines)


def open_shell(
    paths: Sequence[str | os.PathLike] = (),
    *,
    cluster: str | None = None,
    command: str | None = None,
    use_ipython: bool | None = None,
    idle_timeout: str | None = None,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Open ``paths`` as ``data1 … dataN`` and start an interactive shell with a Dask client.

    Parameters
    ----------
    paths
        Files to open with :func:`bigcat.open_dataset` (h5ad, Zarr, Parquet).
    cluster
        Cluster spec for :func:`bigcat.cluster.connect` (``None``: ``$DASK_SCHEDULER_ADDRESS``
        or ``local``); a cluster bigcat started is closed when the shell exits.
    command
        Run this code instead of an interactive session (like ``python -c``).
    use_ipython
        Use IPython (when installed); ``None``: when stdin is a terminal.
    idle_timeout
        Stop a cluster bigcat starts after this long without work.
    storage_options
        fsspec options for URL paths (``s3://…``).

    Returns
    -------
    dict
        The shell's namespace after it exits.
    """
    import dask
    import numpy as np
    import pandas as pd
    import xarray as xr

    import bigcat

    namespace: dict[str, Any] = {"bigcat": bigcat, "np": np, "pd": pd, "xr": xr, "dask": dask}
    names = []
    for i, path in enumerate(paths, start=1):
        namespace[f"data{i}"] = open_dataset(path, storage_options=storage_options)
        names.append(f"data{i}")
    with connect(cluster, idle_timeout=idle_timeout) as client:
        namespace["client"] = client
        banner = _banner(namespace, names, client)
        print(banner, flush=True)
        if command is not None:
            exec(compile(command, "<bigcat open -c>", "exec"), namespace)  # noqa: S102 - the user's own code
            return namespace
        if use_ipython is None:
            use_ipython = sys.stdin.isatty()
        if use_ipython:
            try:
                from IPython import start_ipython
            except ImportError:
                use_ipython = False
            else:
                start_ipython(argv=["--no-banner"], user_ns=namespace)
                return namespace
        try:
            import readline
            import rlcompleter

            readline.set_completer(rlcompleter.Completer(namespace).complete)
            readline.parse_and_bind("tab: complete")
        except ImportError:
            pass
        code.interact(banner="", local=namespace, exitmsg="")
    return namespace
