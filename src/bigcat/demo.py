"""``bigcat demo``: the whole pipeline on a synthetic atlas, end to end."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["run_demo"]


def run_demo(
    folder: str | os.PathLike = "demo-data",
    *,
    n_cells: int = 20_000,
    n_genes: int = 32_285,
    n_clusters: int = 50,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Synthesize an atlas, convert it to both Zarr layouts, open it, compute cluster statistics,
    rank marker genes and draw a dot plot of them.

    Parameters
    ----------
    folder
        Where the files go (created if missing; earlier demo outputs are replaced).
    n_cells, n_genes, n_clusters
        Size of the synthetic atlas (default: 20,000 cells × 32,285 genes, 50 clusters).
    progress
        Progress bars; ``None``: on a terminal only.

    Returns
    -------
    dict
        The paths written (``h5ad``, ``sparse``, ``dense``, ``stats``, ``dotplot``).
    """
    import numpy as np

    from bigcat.convert import convert
    from bigcat.dataset import open_dataset
    from bigcat.synth import synth

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"h5ad": folder / "atlas.h5ad", "sparse": folder / "atlas.zarr", "dense": folder / "atlas-dense.zarr"}
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    step(f"synthesizing {n_cells:,} cells × {n_genes:,} genes, {n_clusters} clusters → {paths['h5ad']}")
    synth(paths["h5ad"], n_cells=n_cells, n_genes=n_genes, n_clusters=n_clusters, overwrite=True, progress=progress)
    step(f"converting → {paths['sparse']} (sparse layout)")
    convert(paths["h5ad"], paths["sparse"], overwrite=True, progress=progress)
    step(f"sampling 4,000 random cells → {paths['dense']} (dense layout)")
    from bigcat.sample import sample

    sample(paths["h5ad"], paths["dense"], n_cells=min(4000, n_cells), layout="dense", overwrite=True, progress=progress)
    step(f"opening {paths['sparse']}")
    ds = open_dataset(paths["sparse"])
    print(ds)
    block = ds.X.data.blocks[0].compute()
    print(
        f"\nX is a Dask array of {ds.X.data.npartitions} row blocks; block 0 is a {type(block).__module__}."
        f"{type(block).__name__} of shape {block.shape} with {block.nnz:,} non-zeros (never densified)"
    )
    sizes = np.unique(ds["cluster"].values, return_counts=True)[1]
    print(f"clusters: {len(sizes)}, cells per cluster from {sizes.min()} to {sizes.max()}")
    dense_ds = open_dataset(paths["dense"])
    print(
        f"dense layout: X {dict(dense_ds.sizes)}, chunks {dense_ds.X.data.chunksize}, same coordinates: "
        f"{sorted(dense_ds.coords) == sorted(ds.coords)}"
    )
    step(f"cluster statistics (log2 CPM, blocks engine) of {paths['sparse']}")
    from bigcat._io.source import open_source
    from bigcat.stats import cluster_stats, write_stats

    result = cluster_stats(paths["sparse"], by="cluster", stats=("means", "present", "sqr_means"), normalize="log2cpm")
    paths["stats"] = folder / "stats.parquet"
    write_stats(result, paths["stats"], overwrite=True)
    print(result)
    with open_source(paths["sparse"]) as source:
        truth = source.uns.get("bigcat_synth", {}).get("markers")
    print(f"statistics written to {paths['stats']}")
    step("marker genes (bigcat.markers) and a dot plot of them (bigcat.dotplot)")
    from bigcat.marker_genes import markers
    from bigcat.plot import dotplot, save

    table = markers(result, top=2)
    genes = result["gene"].values
    planted = set()
    if truth is not None:
        planted = {(str(result["cluster"].values[i]), str(genes[g])) for i, row in enumerate(truth) for g in row}
    print("best marker of the first clusters (score = q_diff × log fold change vs the runner-up cluster):")
    for _, row in table[table["rank"] == 1].head(5).iterrows():
        known = "" if not planted else "  (planted)" if (str(row.cluster), row.gene) in planted else "  (not planted)"
        print(
            f"  {row.cluster}: {row.gene}  mean {row['mean']:.2f} vs {row.mean_other:.2f} in {row.runner_up}, "
            f"present in {row.present:.0%} vs at most {row.present_other:.0%} elsewhere{known}"
        )
    if planted:
        found = sum((str(c), str(g)) in planted for c, g in zip(table["cluster"], table["gene"], strict=True))
        print(f"top 2 markers of {table['cluster'].nunique()} clusters: {found} of {len(table)} are planted markers")
    paths["dotplot"] = folder / "dotplot.png"
    save(dotplot(result, markers=2, title="Top 2 marker genes per cluster (synthetic atlas)"), paths["dotplot"],
         overwrite=True)  # fmt: skip
    print(f"dot plot written to {paths['dotplot']}")
    step("done")
    return paths
