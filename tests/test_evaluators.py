"""Evaluators by name (lafs_jax.eval.evaluators): the 'verification' and 'ijb' types against the functions
they wrap, with a NumPy stand-in for the embedder; config errors naming the key; a type registered here."""
import math
import os

import ml_collections
import numpy as np
import pytest

from lafs_jax.config import ConfigError
from lafs_jax.eval import evaluators, ijb, roc, verification
from lafs_jax.input.verification_bin import load_bin, save_bin
from test_ijb import _ProjectionEmbedder, _write_ijb_folder
from test_ijb_identification import _write_csv

SIZE = 16


class _FakeEmbedder:
    """embed.Embedder's `.embed` contract in NumPy: tanh of the pixels times `variables['w']`, flip-summed."""

    def __init__(self, batch_size, image_size=SIZE):
        self.batch_size, self.image_size = batch_size, image_size
        self.calls = []

    @staticmethod
    def project(images, w):
        x = images.astype(np.float64) / 127.5 - 1.0
        return np.tanh(x.reshape(len(x), -1) @ w)

    def embed(self, images, flip=True, variables=None):
        self.calls.append((len(images), flip))
        e = self.project(images, variables["w"])
        return e + self.project(images[:, :, ::-1], variables["w"]) if flip else e


class _Factory:
    def __init__(self, image_size=SIZE):
        self.image_size, self.built = image_size, []

    def __call__(self, batch_size):
        self.built.append(_FakeEmbedder(batch_size, self.image_size))
        return self.built[-1]


def _variables(seed=0, dim=8):
    return {"w": np.random.default_rng(seed).normal(0, 1.0 / math.sqrt(SIZE * SIZE * 3), (SIZE * SIZE * 3, dim))}


def _write_bin(path, pairs, seed):
    """A .bin of `pairs` pairs: genuine pairs are one noisy pattern twice, impostors two patterns."""
    rng = np.random.default_rng(seed)
    issame = np.arange(pairs) % 2 == 0
    images = []
    for same in issame:
        a = rng.integers(0, 256, (SIZE, SIZE, 3))
        b = a if same else rng.integers(0, 256, (SIZE, SIZE, 3))
        for base in (a, b):
            images.append(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))
    save_bin(str(path), np.stack(images), issame)
    return str(path)


def _evals(**entries):
    return ml_collections.ConfigDict({name: cfg for name, cfg in entries.items()})


def test_names_and_default_fields():
    assert {"verification", "ijb"} <= set(evaluators.names())
    c = evaluators.evaluator_config("verification", bins=("x.bin",), nfolds=5)
    assert c.to_dict() == {"type": "verification", "every_steps": 5000, "at_start": False, "bins": ("x.bin",),
                           "batch_size": 64, "flip": True, "nfolds": 5, "image_size": 0}
    c = evaluators.evaluator_config("ijb")
    assert (c.type, c.root, tuple(c.targets), c.flip, c.at_start, c.identification) == ("ijb", "", ("IJBC",), True,
                                                                                        False, False)
    with pytest.raises(ValueError, match="no field 'nfold'"):
        evaluators.evaluator_config("verification", nfold=5)
    with pytest.raises(ValueError, match="not registered"):
        evaluators.evaluator_config("nope")
    assert issubclass(evaluators.EvaluationError, RuntimeError)


def test_verification_evaluator_equals_the_pair_protocol(tmp_path):
    paths = (_write_bin(tmp_path / "lfw.bin", 30, seed=1), _write_bin(tmp_path / "cfp_fp.bin", 20, seed=2))
    factory = _Factory()
    cfg = evaluators.evaluator_config("verification", bins=paths, every_steps=7, at_start=True, batch_size=32,
                                      nfolds=5)
    [ev] = evaluators.build_evaluators(_evals(val=cfg), embedder_factory=factory, image_size=SIZE)
    assert (ev.name, ev.every_steps, ev.at_start) == ("val", 7, True)
    assert [e.batch_size for e in factory.built] == [32]
    variables = _variables()
    results = ev.run(variables)
    assert list(results) == ["lfw", "cfp_fp"]
    for name, path in zip(("lfw", "cfp_fp"), paths):
        images, issame = load_bin(path, SIZE)
        emb = factory.built[0].embed(images, flip=True, variables=variables)
        assert results[name] == verification.evaluate_pairs_embeddings(emb, issame, nfolds=5)
    assert results["lfw"]["num_pairs"] == 30 and results["cfp_fp"]["num_pairs"] == 20
    assert results["lfw"]["accuracy"] > 0.6  # the stand-in sees the shared pattern of genuine pairs

    scalars = ev.scalars(results)
    assert set(scalars) == {f"{s}/{k}" for s in ("lfw", "cfp_fp") for k in ("accuracy", "accuracy_std", "best_threshold")}
    assert scalars["lfw/accuracy"] == results["lfw"]["accuracy"]
    mean = (results["lfw"]["accuracy"] + results["cfp_fp"]["accuracy"]) / 2
    assert ev.score(results) == pytest.approx(mean, abs=1e-15)
    assert ev.checkpoint_metrics(results) == {"accuracy": pytest.approx(mean, abs=1e-15),
                                              "lfw/accuracy": results["lfw"]["accuracy"],
                                              "cfp_fp/accuracy": results["cfp_fp"]["accuracy"],
                                              "lfw/best_threshold": results["lfw"]["best_threshold"],
                                              "cfp_fp/best_threshold": results["cfp_fp"]["best_threshold"]}
    assert ev.report(results) == roc.markdown_table(results, verification.DEFAULT_FARS)

    # other variables, other embeddings; flip=False reaches the embedder
    cfg.flip = False
    [ev] = evaluators.build_evaluators(_evals(val=cfg), embedder_factory=factory, image_size=SIZE)
    other = ev.run(_variables(seed=1))
    assert all(flip is False for _, flip in factory.built[-1].calls)
    assert other["lfw"]["fold_accuracies"] != results["lfw"]["fold_accuracies"] or \
        other["lfw"]["best_threshold"] != results["lfw"]["best_threshold"]


def test_image_size_from_the_embedder_or_the_field(tmp_path):
    path = _write_bin(tmp_path / "agedb.bin", 10, seed=3)
    cfg = evaluators.evaluator_config("verification", bins=(path,))
    [ev] = evaluators.build_evaluators(_evals(val=cfg), embedder_factory=_Factory())  # 0: the embedder's
    assert ev.sets["agedb"][0].shape == (20, SIZE, SIZE, 3)
    cfg.image_size = 24
    with pytest.raises(ConfigError, match=r"config\.evals\.val\.image_size=24 .*model's image size 16"):
        evaluators.build_evaluators(_evals(val=cfg), embedder_factory=_Factory(), image_size=SIZE)


def _bad_cases(tmp_path):
    good = _write_bin(tmp_path / "good.bin", 12, seed=4)
    few = _write_bin(tmp_path / "few.bin", 3, seed=5)
    garbage = str(tmp_path / "garbage.bin")
    open(garbage, "wb").write(b"not a pickle")
    v = lambda **kw: ml_collections.ConfigDict({"type": "verification", "bins": (good,), **kw})  # noqa: E731
    return {  # name: (entry, key the error names, text it also holds, caught by validate_evals already)
        "missing_bin": (v(bins=(str(tmp_path / "missing.bin"),)), r"evals\.val\.bins\[0\]", "missing.bin", True),
        "second_missing": (v(bins=(good, str(tmp_path / "no.bin"))), r"evals\.val\.bins\[1\]", "no.bin", True),
        "too_few_pairs": (v(bins=(good, few)), r"evals\.val\.bins\[1\]", r"few\.bin.*nfolds=10.*holds 3", False),
        "not_a_bin": (v(bins=(garbage,)), r"evals\.val\.bins\[0\]", "garbage.bin", False),
        "unknown_type": (ml_collections.ConfigDict({"type": "lfw", "every_steps": 10}), r"evals\.val\.type",
                         r"registered types \['ijb', 'verification'", True),
        "every_steps_0": (v(every_steps=0), r"evals\.val\.every_steps", "an int >= 1", True),
        "unknown_field": (ml_collections.ConfigDict({"type": "verification", "bins": (good,), "nfold": 5}),
                          r"evals\.val\.nfold", "its fields", True),
        "nfolds_1": (v(nfolds=1), r"evals\.val\.nfolds", ">= 2", True),
        "batch_size_0": (v(batch_size=0), r"evals\.val\.batch_size", ">= 1", True),
        "flip_str": (v(flip="yes"), r"evals\.val\.flip", "True or False", True),
        "no_bins": (v(bins=()), r"evals\.val\.bins", "non-empty", True),
        "same_set_name": (v(bins=(good, str(tmp_path / "x" / "good.bin"))), r"evals\.val\.bins\[1\]", "", True),
    }


CASES = ("missing_bin", "second_missing", "too_few_pairs", "not_a_bin", "unknown_type", "every_steps_0",
         "unknown_field", "nfolds_1", "batch_size_0", "flip_str", "no_bins", "same_set_name")


@pytest.mark.parametrize("case", CASES)
def test_a_bad_entry_is_one_config_error_naming_the_key(tmp_path, case):
    os.makedirs(tmp_path / "x")
    _write_bin(tmp_path / "x" / "good.bin", 12, seed=6)
    entry, key, text, at_validation = _bad_cases(tmp_path)[case]
    evals = _evals(val=entry)
    if at_validation:
        with pytest.raises(ConfigError, match=rf"^config\.{key}=.*{text}"):
            evaluators.validate_evals(evals)
    else:
        evaluators.validate_evals(evals)  # the config is fine; the file is read at build time
    factory = _Factory()
    with pytest.raises(ConfigError, match=rf"^config\.{key}=.*{text}"):
        evaluators.build_evaluators(evals, embedder_factory=factory, image_size=SIZE)


def test_prefix_names_the_section():
    evals = _evals(val=ml_collections.ConfigDict({"type": "verification", "every_steps": 0}))
    with pytest.raises(ConfigError, match=r"^config\.train\.evals\.val\.every_steps=0"):
        evaluators.validate_evals(evals, prefix="train.evals")


def test_a_type_registered_here_is_built_by_name(monkeypatch):
    monkeypatch.setattr(evaluators, "_REGISTRY", dict(evaluators._REGISTRY))

    @evaluators.register("constant")
    class Constant(evaluators.Evaluator):
        @classmethod
        def default_config(cls):
            c = super().default_config()
            c.value = 1.0  # what run returns
            return c

        @classmethod
        def validate(cls, config, key):
            evaluators.check(config.value >= 0, f"{key}.value", config.value, ">= 0")

        def run(self, variables):
            return {"value": self.config.value, "n": len(variables)}

        def scalars(self, results):
            return {"value": float(results["value"])}

    assert "constant" in evaluators.names()
    assert evaluators.evaluator_config("constant", value=3.0).to_dict() == {
        "type": "constant", "every_steps": 5000, "at_start": False, "value": 3.0}
    with pytest.raises(ValueError, match="already registered"):
        evaluators.register("constant")(Constant)
    with pytest.raises(ValueError, match="already registered"):
        evaluators.register("verification")(Constant)
    evals = _evals(a=ml_collections.ConfigDict({"type": "constant", "value": 2.0}),
                   b=evaluators.evaluator_config("constant", every_steps=3, at_start=True))
    a, b = evaluators.build_evaluators(evals, embedder_factory=_Factory())
    assert isinstance(a, Constant) and (a.name, a.every_steps, a.at_start) == ("a", 5000, False)
    assert (b.name, b.every_steps, b.at_start) == ("b", 3, True)
    r = a.run({"params": 1})
    assert r == {"value": 2.0, "n": 1} and a.scalars(r) == {"value": 2.0}
    assert a.score(r) is None and a.checkpoint_metrics(r) == a.scalars(r)
    assert "| value | 2 |" in a.report(r)
    with pytest.raises(ConfigError, match=r"^config\.evals\.a\.value=-1"):
        evaluators.validate_evals(_evals(a=evaluators.evaluator_config("constant", value=-1.0)))


class _IJBEmbedder:
    """The ijb tests' projection model behind the Embedder's `.embed` contract."""

    image_size = ijb.ALIGNED_SIZE

    def __init__(self, batch_size):
        self.batch_size, self.model = batch_size, _ProjectionEmbedder()

    def embed(self, images, flip=True, variables=None):
        assert variables == {"params": "v"}
        return self.model(images, flip)


@pytest.mark.parametrize("nested", [False, True])
def test_ijb_evaluator_equals_evaluate_target(tmp_path, nested):
    root = str(tmp_path / "IJBC")
    _write_ijb_folder(root, np.random.default_rng(7))
    cfg = evaluators.evaluator_config("ijb", root=str(tmp_path) if nested else root, batch_size=16, every_steps=100)
    [ev] = evaluators.build_evaluators(_evals(ijb_c=cfg), embedder_factory=_IJBEmbedder, image_size=112)
    assert (ev.name, ev.every_steps, ev.at_start, ev.roots) == ("ijb_c", 100, False, {"IJBC": root})
    results = ev.run({"params": "v"})
    want = ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBC", batch_size=16)
    assert list(results) == ["IJBC"]
    assert results["IJBC"]["tar_at_far"] == want["tar_at_far"]
    np.testing.assert_array_equal(results["IJBC"]["scores"], want["scores"])
    scalars = ev.scalars(results)
    assert scalars == {f"IJBC/tar@far={far:g}": want["tar_at_far"][far] for far in ijb.FARS}
    assert "IJBC/tar@far=0.0001" in scalars
    assert ev.score(results) == want["tar_at_far"][1e-4]
    assert "| IJBC |" in ev.report(results)
    assert ev.checkpoint_metrics(results) == scalars


def test_ijb_identification_scalars_and_report(tmp_path):
    root = str(tmp_path / "IJBC")
    _write_ijb_folder(root, np.random.default_rng(3))  # templates 101..118, identity (tid - 101) // 3
    subject = {t: (t - 101) // 3 for t in range(101, 119)}
    for name, keep in (("gal_G1", lambda t: (t - 101) % 3 == 0 and subject[t] < 3),
                       ("gal_G2", lambda t: (t - 101) % 3 == 0 and subject[t] >= 3),
                       ("probe_mixed", lambda t: (t - 101) % 3 != 0)):
        _write_csv(os.path.join(root, "meta", f"ijbc_1N_{name}.csv"), [(t, s) for t, s in subject.items() if keep(t)])
    cfg = evaluators.evaluator_config("ijb", root=root, identification=True)
    [ev] = evaluators.build_evaluators(_evals(ijb=cfg), embedder_factory=_IJBEmbedder, image_size=112)
    results = ev.run({"params": "v"})
    mean = results["IJBC"]["identification"]["mean"]
    scalars = ev.scalars(results)
    assert {k: scalars[k] for k in scalars if "tar@far" not in k} == {
        **{f"IJBC/rank-{k}": v for k, v in mean["rank"].items()},
        **{f"IJBC/tpir@fpir={f:g}": v for f, v in mean["tpir_at_fpir"].items() if v is not None}}
    assert scalars["IJBC/rank-1"] == 1.0 and "IJBC/tpir@fpir=0.01" not in scalars  # 6 non-mated probes: None
    assert "rank-1" in ev.report(results) and "| IJBC |" in ev.report(results)


def test_ijb_score_is_the_mean_tar_at_score_far():
    ev = evaluators.IJBEvaluator.__new__(evaluators.IJBEvaluator)
    ev.config = evaluators.evaluator_config("ijb")
    results = {"IJBB": {"tar_at_far": {1e-6: None, 1e-5: 0.5, 1e-4: 0.75}},
               "IJBC": {"tar_at_far": {1e-6: 0.25, 1e-5: 0.7, 1e-4: 0.8}}}
    assert ev.score(results) == pytest.approx(0.775)
    ev.config.score_far = 1e-5
    assert ev.score(results) == pytest.approx(0.6)
    ev.config.score_far = 1e-6
    assert ev.score(results) is None  # IJBB has no value at 1e-6
    assert ev.scalars(results) == {"IJBB/tar@far=1e-05": 0.5, "IJBB/tar@far=0.0001": 0.75, "IJBC/tar@far=1e-06": 0.25,
                                   "IJBC/tar@far=1e-05": 0.7, "IJBC/tar@far=0.0001": 0.8}
    assert ev.score({"IJBB": {"tar_at_far": {1e-4: None}}}) is None


def test_ijb_inputs_are_checked_at_build(tmp_path):
    root = str(tmp_path / "IJBC")
    _write_ijb_folder(root, np.random.default_rng(8))

    def build(**kw):
        cfg = evaluators.evaluator_config("ijb", **{"root": root, **kw})
        return evaluators.build_evaluators(_evals(ijb=cfg), embedder_factory=_IJBEmbedder, image_size=112)

    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.root='' "):
        build(root="")
    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.score_far=0\.0003 "):
        build(score_far=3e-4)
    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.root=.*nowhere"):
        build(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.root=.*IJBB.*ijbb_face_tid_mid\.txt"):
        build(targets=("IJBB",))
    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.root=.*ijbc_1N_gal_G1\.csv"):
        build(identification=True)
    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.targets\[1\]='IJBA'"):
        build(targets=("IJBC", "IJBA"))
    with pytest.raises(ConfigError, match=r"^config\.evals\.ijb\.type='ijb' .*takes 224x224"):
        cfg = evaluators.evaluator_config("ijb", root=root)
        evaluators.build_evaluators(_evals(ijb=cfg), embedder_factory=_IJBEmbedder, image_size=224)
