"""MapMyCells query markers against a plain NumPy restatement of cell_type_mapper's greedy
selection (dense masks, every pair re-checked after every gene), the ``query_markers.json``
layout ``from_specified_markers`` reads, and planted markers of ``bigcat synth``."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

import bigcat
from bigcat.cli import main
from bigcat.errors import BigcatInputError
from bigcat.mapmycells import precompute_stats, query_markers, reference_markers


# ------------------------------------------------------------------------------------------
# the restatement
# ------------------------------------------------------------------------------------------
def read_reference(path) -> tuple[list[str], np.ndarray, np.ndarray, dict, dict]:
    """Genes, dense up/down masks (pairs × genes), pair_to_idx and the taxonomy tree."""
    with h5py.File(path, "r") as f:
        genes = json.loads(f["gene_names"][()].decode())
        pair_to_idx = json.loads(f["pair_to_idx"][()].decode())
        n_pairs = int(f["n_pairs"][()])
        masks = []
        for d in ("up", "down"):
            ptr, idx = f[f"sparse_by_pair/{d}_pair_idx"][()], f[f"sparse_by_pair/{d}_gene_idx"][()]
            dense = np.zeros((n_pairs, len(genes)), dtype=bool)
            for p in range(n_pairs):
                dense[p, idx[ptr[p] : ptr[p + 1]]] = True
            masks.append(dense)
        stats_path = json.loads(f["metadata"][()].decode())["precomputed_path"]
    with h5py.File(stats_path, "r") as f:
        tree = json.loads(f["taxonomy_tree"][()].decode())
    return genes, masks[0], masks[1], pair_to_idx, tree


def leaves_under(tree: dict, level: str, node: str) -> list[str]:
    hierarchy = tree["hierarchy"]
    if level == hierarchy[-1]:
        return [node]
    below = hierarchy[hierarchy.index(level) + 1]
    return [leaf for kid in tree[level][node] for leaf in leaves_under(tree, below, kid)]


def pairs_to_compare(tree: dict, pair_to_idx: dict, parent) -> list[int]:
    hierarchy = tree["hierarchy"]
    leaf_level = hierarchy[-1]
    if parent is None:
        level, children = hierarchy[0], list(tree[hierarchy[0]])
    else:
        level, children = hierarchy[hierarchy.index(parent[0]) + 1], tree[parent[0]][parent[1]]
    out = []
    for c1, c2 in itertools.combinations(children, 2):
        for a, b in itertools.product(leaves_under(tree, level, c1), leaves_under(tree, level, c2)):
            a, b = min(a, b), max(a, b)
            out.append(pair_to_idx[leaf_level][a][b])
    return sorted(out)


def restated(up, down, pairs, keep, n_per, at_a_time=1) -> list[int]:
    """cell_type_mapper's select_marker_genes_v2, step by step, on dense masks."""
    m = np.stack([down[pairs][:, keep], up[pairs][:, keep]], axis=1)  # (P, sign, genes)
    n_genes = m.shape[2]
    census = m.sum(axis=2)
    possible = (census >= n_per).sum(axis=1) == 2
    utility = m.sum(axis=(0, 1)).astype(np.int64)
    counts = np.zeros_like(census)
    filled = np.zeros(census.shape, dtype=bool)
    chosen: list[int] = []

    def update(order):
        nonlocal filled
        full = (counts >= n_per) & possible[:, None]
        full |= counts == census
        full |= (counts.sum(axis=1) >= 2 * n_per)[:, None]
        newly = full & ~filled
        for p, s in zip(*np.nonzero(newly), strict=True):
            utility[m[p, s]] -= 1
        filled |= newly
        return list(np.argsort(utility)) if newly.any() or order is None else order

    def take(g, order):
        order.remove(g)
        chosen.append(int(g))
        utility[g] = -1
        counts[:, 0] += m[:, 0, g]
        counts[:, 1] += m[:, 1, g]

    order = update(None)
    totals = census.sum(axis=1)
    for p in np.flatnonzero((totals > 0) & (totals <= n_per)):
        for g in np.flatnonzero(m[p].any(axis=0)):
            if g not in chosen:
                take(g, order)
    while True:
        order = update(order)
        if utility.max() <= 0 or filled.all():
            break
        for _ in range(at_a_time):
            take(order[-1], order)
    assert len(set(chosen)) == len(chosen)
    assert all(0 <= g < n_genes for g in chosen)
    return chosen


def restated_lookup(path, n_per=30, keep_genes=None, at_a_time=1, overrides=None) -> dict:
    genes, up, down, pair_to_idx, tree = read_reference(path)
    keep = np.array([keep_genes is None or g in keep_genes for g in genes]) & ~np.char.startswith(
        np.array(genes), "INVALID_MARKER"
    )
    names = [g for g, k in zip(genes, keep, strict=True) if k]
    parents = [None] + [(lv, node) for lv in tree["hierarchy"][:-1] for node in sorted(tree[lv])]
    out = {}
    for parent in parents:
        key = "None" if parent is None else f"{parent[0]}/{parent[1]}"
        pairs = pairs_to_compare(tree, pair_to_idx, parent)
        n = (overrides or {}).get(key, n_per)
        out[key] = [names[g] for g in restated(up, down, pairs, keep, n, at_a_time)] if pairs else []
    return out


def groups(path) -> dict:
    got = json.loads(Path(path).read_text())
    return {k: v for k, v in got.items() if k not in ("log", "metadata")}


# ------------------------------------------------------------------------------------------
# a synthetic atlas with a taxonomy
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 clusters (planted markers) under 4 subclasses under 2 classes; one subclass has a
    single cluster (nothing to compare under it); 10% of the cells held out."""
    folder = tmp_path_factory.mktemp("query-markers")
    bigcat.synth(folder / "atlas.h5ad", n_cells=6000, n_genes=1500, n_clusters=20, nnz_per_cell=400, seed=5,
                 progress=False)  # fmt: skip
    data = ad.read_h5ad(folder / "atlas.h5ad")
    held = np.random.default_rng(1).random(data.n_obs) < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data[~held].write_h5ad(folder / "reference.h5ad")
        data[held].write_h5ad(folder / "query.h5ad")
    leaves = sorted(set(data.obs["cluster"].astype(str)))
    sub = ["s0"] * 6 + ["s1"] * 6 + ["s2"] * 7 + ["s3"]
    classes = [{"s0": "A", "s1": "A"}.get(s, "B") for s in sub]
    table = pd.DataFrame({"cluster": leaves, "subclass": sub, "class": classes})
    stats = precompute_stats(folder / "reference.h5ad", folder / "stats.h5", hierarchy=["class", "subclass", "cluster"],
                             taxonomy=table)  # fmt: skip
    ref = reference_markers(stats, folder / "reference_markers.h5")
    planted = np.asarray(data.uns["bigcat_synth"]["markers"])
    names = list(data.var_names)
    by_leaf = {leaves[k]: {names[g] for g in planted[k]} for k in range(len(leaves))}
    return {"folder": folder, "stats": stats, "ref": ref, "leaves": leaves, "truth": data[held].obs["cluster"],
            "planted": by_leaf, "genes": names}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"n_per_utility": 3}, {"n_per_utility": 7, "genes_at_a_time": 3},
     {"n_per_utility": 5, "n_per_utility_override": {"None": 2, "class/B": 9}}],
)  # fmt: skip
def test_query_markers_match_the_restatement(atlas: dict, tmp_path, options) -> None:
    out = query_markers(atlas["ref"], tmp_path / "q.json", **options)
    want = restated_lookup(atlas["ref"], options.get("n_per_utility", 30), None, options.get("genes_at_a_time", 1),
                           options.get("n_per_utility_override"))  # fmt: skip
    got = groups(out)
    assert got == want  # same genes, same order
    assert set(got) == {"None", "class/A", "class/B", "subclass/s0", "subclass/s1", "subclass/s2", "subclass/s3"}
    assert got["subclass/s3"] == []  # one child: nothing to compare
    assert all(len(got[k]) > 0 for k in got if k != "subclass/s3")


def test_query_genes_and_invalid_markers_are_left_out(atlas: dict, tmp_path) -> None:
    """Only the query's genes can be markers; the others are dropped before the greedy
    choice (which renumbers the genes, as cell_type_mapper's thinning does)."""
    query = [g for i, g in enumerate(atlas["genes"]) if i % 3]
    out = query_markers(atlas["ref"], tmp_path / "q.json", genes=query, n_per_utility=4)
    got = groups(out)
    assert got == restated_lookup(atlas["ref"], 4, set(query))
    assert set(itertools.chain(*got.values())) <= set(query)


def test_a_dropped_level_hangs_its_children_from_their_parents(atlas: dict, tmp_path) -> None:
    got = groups(query_markers(atlas["ref"], tmp_path / "q.json", drop_level="subclass", n_per_utility=4))
    assert set(got) == {"None", "class/A", "class/B"}
    genes, up, down, pair_to_idx, _ = read_reference(atlas["ref"])
    leaves = atlas["leaves"]
    keep = np.ones(len(genes), bool)
    for node, members in (("A", leaves[:12]), ("B", leaves[12:])):
        pairs = sorted(pair_to_idx["cluster"][a][b] for a, b in itertools.combinations(members, 2))
        assert got[f"class/{node}"] == [genes[g] for g in restated(up, down, pairs, keep, 4)]


def test_planted_markers_are_chosen_and_map_as_well_as_the_default_markers(atlas: dict, tmp_path) -> None:
    got = groups(query_markers(atlas["ref"], tmp_path / "q.json"))
    chosen = set(itertools.chain(*got.values()))
    planted = set().union(*atlas["planted"].values())
    print(f"{len(chosen)} query markers, {len(chosen & planted)} planted; {len(planted)} planted in all")
    assert len(chosen & planted) / len(chosen) > 0.95
    assert len(chosen & planted) / len(planted) > 0.8
    # mapping the held-out cells with bigcat's own map_cells on these genes
    stats = bigcat.cluster_stats(atlas["folder"] / "reference.h5ad", normalize="log2cpm")
    truth = atlas["truth"].astype(str).to_numpy()
    mine = bigcat.map_cells(atlas["folder"] / "query.h5ad", stats, genes=sorted(chosen))
    default = bigcat.map_cells(atlas["folder"] / "query.h5ad", stats)
    acc_mine = float(np.mean(mine["cluster"].astype(str).to_numpy() == truth))
    acc_default = float(np.mean(default["cluster"].astype(str).to_numpy() == truth))
    print(f"held out: {acc_mine:.1%} with the query markers, {acc_default:.1%} with the default markers")
    assert acc_mine >= acc_default


def test_the_json_cell_type_mapper_reads(atlas: dict, tmp_path) -> None:
    """``from_specified_markers`` reads every key but ``log`` and ``metadata`` as a parent
    ("None" or "level/node") mapped to reference gene names; the log has its keys."""
    out = query_markers(atlas["ref"], tmp_path / "q.json", n_per_utility=5)
    doc = json.loads(Path(out).read_text())
    _, _, _, pair_to_idx, tree = read_reference(atlas["ref"])
    assert list(doc)[-2:] == ["log", "metadata"]
    names = set(atlas["genes"])
    for key, genes in groups(out).items():
        assert all(isinstance(g, str) and g in names for g in genes)
        assert len(set(genes)) == len(genes)
        entry = doc["log"][key]
        if genes:
            assert entry["n_genes"] == len(genes)
            parent = None if key == "None" else tuple(key.split("/"))
            assert entry["filled"] + entry["unfilled"] == 2 * len(pairs_to_compare(tree, pair_to_idx, parent))
            assert set(entry["marker_distribution"]) == {"lt_1", "lt_5"}
        else:
            assert entry == {"n_genes": 0, "msg": "Skipping; no leaf nodes to compare"}
    assert doc["metadata"]["config"]["n_per_utility"] == 5
    assert doc["metadata"]["written_by"] == "bigcat"


def test_cli_stats_elsewhere_and_bad_input(atlas: dict, tmp_path, capsys) -> None:
    out = tmp_path / "q.json"
    assert main(["mapmycells", "query-markers", str(atlas["ref"]), "--out", str(out), "--n-per-utility", "4",
                 "--n-per-utility-override", "class/A=2", "--quiet"]) == 0  # fmt: skip
    assert groups(out) == restated_lookup(atlas["ref"], 4, overrides={"class/A": 2})
    # --overwrite replaces a file bigcat wrote; without it the run is refused
    assert main(["mapmycells", "query-markers", str(atlas["ref"]), "--out", str(out), "--quiet"]) == 2
    assert main(["mapmycells", "query-markers", str(atlas["ref"]), "--out", str(out), "--quiet", "--overwrite"]) == 0
    capsys.readouterr()
    # the statistics moved: found beside the reference markers, or given with --stats
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "reference_markers.h5").write_bytes(atlas["ref"].read_bytes())
    with h5py.File(moved / "reference_markers.h5", "a") as f:
        meta = json.loads(f["metadata"][()].decode())
        meta["precomputed_path"] = str(tmp_path / "gone" / "stats.h5")
        del f["metadata"]
        f["metadata"] = json.dumps(meta).encode()
    assert main(["mapmycells", "query-markers", str(moved / "reference_markers.h5"), "--out", str(tmp_path / "x.json"),
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "reference_markers.h5" in err[0]
    assert "--stats" in err[0]
    assert not (tmp_path / "x.json").exists()
    assert main(["mapmycells", "query-markers", str(moved / "reference_markers.h5"), "--out", str(tmp_path / "x.json"),
                 "--stats", str(atlas["stats"]), "--n-per-utility", "4", "--n-per-utility-override", "class/A=2",
                 "--quiet"]) == 0  # fmt: skip
    assert groups(tmp_path / "x.json") == restated_lookup(atlas["ref"], 4, overrides={"class/A": 2})
    # not a reference-markers file; an unknown parent; a bad override
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert main(["mapmycells", "query-markers", str(tmp_path / "junk.h5"), "--out", str(tmp_path / "y.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "junk.h5" in err[0]
    assert "not an HDF5 file" in err[0]
    with pytest.raises(BigcatInputError, match="subclass/nope"):
        query_markers(atlas["ref"], tmp_path / "y.json", n_per_utility_override={"subclass/nope": 3})
    assert main(["mapmycells", "query-markers", str(atlas["ref"]), "--out", str(tmp_path / "y.json"),
                 "--n-per-utility-override", "class/A"]) == 2  # fmt: skip
    assert not (tmp_path / "y.json").exists()


def test_a_pair_index_written_otherwise_is_read_as_a_dict(atlas: dict, tmp_path) -> None:
    """A pair_to_idx not byte for byte bigcat's (another JSON writer) is looked up, not assumed."""
    copy = tmp_path / "reference_markers.h5"
    copy.write_bytes(atlas["ref"].read_bytes())
    with h5py.File(copy, "a") as f:
        compact = json.dumps(json.loads(f["pair_to_idx"][()].decode()), separators=(",", ":"))
        del f["pair_to_idx"]
        f["pair_to_idx"] = compact.encode()
    got = groups(query_markers(copy, tmp_path / "q.json", n_per_utility=4))
    assert got == groups(query_markers(atlas["ref"], tmp_path / "r.json", n_per_utility=4))
    assert got == restated_lookup(copy, 4)


def test_reference_and_query_markers_on_s3(atlas: dict, s3, tmp_path) -> None:
    """Statistics, reference markers and query markers all as s3:// URLs (a real S3 server on
    127.0.0.1): the same files as on local disk."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True)
    fs.put(str(atlas["stats"]), "bigcat-test/mmc/stats.h5")
    options = s3.options()
    ref = reference_markers("s3://bigcat-test/mmc/stats.h5", "s3://bigcat-test/mmc/reference_markers.h5",
                            storage_options=options)  # fmt: skip
    out = query_markers(ref, "s3://bigcat-test/mmc/query_markers.json", n_per_utility=5, storage_options=options)
    fs.get("bigcat-test/mmc/reference_markers.h5", str(tmp_path / "ref.h5"))
    fs.get(str(out).removeprefix("s3://"), str(tmp_path / "q.json"))
    with h5py.File(tmp_path / "ref.h5") as remote, h5py.File(atlas["ref"]) as local:
        for key in ("sparse_by_pair/up_gene_idx", "sparse_by_pair/down_gene_idx", "sparse_by_gene/up_pair_idx"):
            np.testing.assert_array_equal(remote[key][()], local[key][()])
        assert json.loads(remote["metadata"][()].decode())["precomputed_path"] == "s3://bigcat-test/mmc/stats.h5"
    assert groups(tmp_path / "q.json") == restated_lookup(atlas["ref"], 5)
