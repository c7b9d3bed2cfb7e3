"""IJB 1:N identification: rank-k and TPIR@FPIR against a brute-force NumPy search, the protocol CSVs,
and the 1:N pass of evaluate_target on a generated IJB-format folder."""
import os

import numpy as np
import pytest

from lafs_jax.eval import ijb
from lafs_jax.numerics import l2_normalize
from test_ijb import _ProjectionEmbedder, _write_ijb_folder


def _brute_force(probe, psub, gallery, gsub, ranks, fpirs):
    """Per probe: sort the gallery by score; rank = position of the first mated entry (ties: the mated
    entry after the others). Open set: every threshold t among the top-1 scores (and -inf), the highest
    TPIR whose FPIR (non-mated top-1 > t) is at most the target."""
    rank, top1, best = [], [], []
    for p, s in zip(probe, psub):
        scores = gallery @ p
        mated = gsub == s
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], bool(mated[j])))
        rank.append(next((i + 1 for i, j in enumerate(order) if mated[j]), None))
        top1.append(scores.max())
        best.append(scores[mated].max() if mated.any() else None)
    is_mated = np.array([r is not None for r in rank])
    out = {"rank": {k: np.mean([r <= k for r in rank if r is not None]) for k in ranks}, "tpir_at_fpir": {}}
    nm = np.array(top1)[~is_mated]
    for fpir in fpirs:
        if int(np.floor(fpir * len(nm))) < 1:
            out["tpir_at_fpir"][fpir] = None
            continue
        best_tpir = 0.0
        for t in np.concatenate([[-np.inf], np.array(top1)]):
            if np.mean(nm > t) <= fpir:
                hits = [r == 1 and b > t for r, b in zip(rank, best) if r is not None]
                best_tpir = max(best_tpir, float(np.mean(hits)))
        out["tpir_at_fpir"][fpir] = best_tpir
    return out


def test_identification_equals_brute_force_search():
    rng = np.random.default_rng(0)
    n_subjects, dim = 60, 8
    centres = rng.normal(size=(n_subjects, dim))
    gsub = np.arange(40)  # subjects 40..59 are not enrolled: their probes are non-mated
    gallery = l2_normalize(centres[gsub] + 0.6 * rng.normal(size=(40, dim)))
    psub = rng.integers(0, n_subjects, 500)
    probe = l2_normalize(centres[psub] + 0.6 * rng.normal(size=(500, dim)))
    got = ijb.identification(probe, psub, gallery, gsub, ranks=(1, 2, 5), fpirs=(1e-2, 5e-2, 1e-1, 1e-3))
    want = _brute_force(probe, psub, gallery, gsub, (1, 2, 5), (1e-2, 5e-2, 1e-1, 1e-3))
    assert got["num_mated"] == int(np.sum(psub < 40)) and got["num_nonmated"] == int(np.sum(psub >= 40))
    for k in (1, 2, 5):
        assert got["rank"][k] == pytest.approx(want["rank"][k], abs=1e-12)
    assert 0.3 < got["rank"][1] < got["rank"][5] < 1.0  # a non-trivial problem
    for fpir in (1e-2, 5e-2, 1e-1):
        assert got["tpir_at_fpir"][fpir] == pytest.approx(want["tpir_at_fpir"][fpir], abs=1e-12)
    assert got["tpir_at_fpir"][1e-3] is None  # fewer than 1000 non-mated probes
    assert got["tpir_at_fpir"][1e-2] <= got["tpir_at_fpir"][1e-1] <= got["rank"][1]
    with pytest.raises(ValueError, match="must be"):
        ijb.identification(probe, psub[:3], gallery, gsub)


def _write_csv(path, rows):
    with open(path, "w") as f:
        f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n")
        for t, s in rows:
            f.write(f"{t},{s},img/{t}.jpg,1\n{t},{s},img/{t}_b.jpg,2\n")  # two images per template


def test_evaluate_target_searches_the_1n_galleries_with_the_same_template_features(tmp_path):
    rng = np.random.default_rng(3)
    root = str(tmp_path / "IJBC")
    _write_ijb_folder(root, rng)  # templates 101..118, 3 per identity (identity = (tid - 101) // 3)
    subject = {t: (t - 101) // 3 for t in range(101, 119)}
    g1 = [t for t in subject if (t - 101) % 3 == 0 and subject[t] < 3]
    g2 = [t for t in subject if (t - 101) % 3 == 0 and subject[t] >= 3]
    probes = [t for t in subject if (t - 101) % 3 != 0]
    _write_csv(os.path.join(root, "meta", "ijbc_1N_gal_G1.csv"), [(t, subject[t]) for t in g1])
    _write_csv(os.path.join(root, "meta", "ijbc_1N_gal_G2.csv"), [(t, subject[t]) for t in g2])
    _write_csv(os.path.join(root, "meta", "ijbc_1N_probe_mixed.csv"), [(t, subject[t]) for t in probes])
    r = ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBC", batch_size=8, identification=True)
    ident = r["identification"]
    assert set(ident) == {"G1", "G2", "mean"}
    assert ident["G1"]["num_mated"] == ident["G2"]["num_mated"] == 6 and ident["G1"]["num_nonmated"] == 6
    assert ident["G1"]["rank"][1] == 1.0 and ident["G2"]["rank"][1] == 1.0  # the stand-in separates identities
    assert ident["mean"]["rank"][1] == 1.0 and ident["mean"]["tpir_at_fpir"][1e-2] is None  # 6 non-mated probes
    paths = ijb.write_report({"IJBC": r}, str(tmp_path / "report"))
    assert "rank-1" in open(paths["markdown"]).read()


def test_protocol_csv_errors_name_the_file_and_line(tmp_path):
    path = str(tmp_path / "g.csv")
    with open(path, "w") as f:
        f.write("TEMPLATE_ID,SUBJECT_ID\n1,5\n1,6\n")
    with pytest.raises(ValueError, match=r"g\.csv:3: template 1 listed under subjects 5 and 6"):
        ijb.read_template_subjects(path)
    with open(path, "w") as f:
        f.write("TID,SID\n1,5\n")
    with pytest.raises(ValueError, match=r"g\.csv:1: header .* lacks TEMPLATE_ID"):
        ijb.read_template_subjects(path)
    with pytest.raises(FileNotFoundError, match="1:N protocol file not found"):
        ijb.read_template_subjects(str(tmp_path / "missing.csv"))
    assert ijb.identification_paths("/r", "IJBB")["S2"] == "/r/meta/ijbb_1N_gal_S2.csv"
