"""What the fine-tuning loop guarantees when things go wrong, on a very small Part fViT (32 px, depth 1,
batch 8, 4 steps, a checkpoint every step): divergence keeps only confirmed checkpoints and a relaunch
resumes from the one it names; a corrupted latest checkpoint falls back to the previous one; a NaN
loss deletes the checkpoint it condemns; an exception mid-loop closes the checkpointer; an evaluation
error comes after its step's checkpoint; a .bin with too few pairs fails at start-up.

Two programs are compiled (lr 1e30 and the normal lr); every other run hits the session's cache."""
import glob
import logging
import os

import jax
import numpy as np
import pytest

from configs import finetune as finetune_recipe
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.eval import embed as embed_lib
from lafs_jax.input.synthetic import write_synthetic_rec
from lafs_jax.input.verification_bin import save_bin
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import finetune, loop_utils


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("crash_data") / "train")
    write_synthetic_rec(prefix, num_classes=6, per_class=4, size=32)  # 24 images: 3 steps per epoch
    return prefix


def small_config(data_path: str, lr: float = 5e-3):
    """configs/finetune.py:tiny shrunk: 32 px, 16 landmarks, 2 landmark blocks, depth 1, dim 48, batch 8,
    the landmark CNN frozen (a program that compiles in a third of the time). One warmup epoch (3 steps):
    the lr of update 1 is 0, of update 2 lr / 3."""
    c = finetune_recipe.get_config("tiny")
    m = c.model
    m.image_size, m.num_landmarks, m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = 32, 16, 48, 1, 2, 24, 96
    m.landmark.blocks = m.landmark.blocks[:2]
    c.data.path, c.data.image_size, c.data.finetune.randaugment = data_path, 32, False
    c.eval.bins, c.eval.at_start = (), False
    c.batch_size, c.total_steps, c.checkpoint.every_steps, c.log_every_steps = 8, 4, 1, 1
    c.freeze_landmark_cnn = True
    c.optim.lr = lr
    return c


def checkpoints(work):
    return ckpt_lib.TrainCheckpointer(os.path.join(work, "checkpoints"))


def altered_batches(monkeypatch, at_call: int, change):
    """Make the loop's `at_call`-th fetched batch pass through `change` (a corrupt batch, as from bad data)."""
    real, calls = loop_utils.next_batch, []

    def next_batch(iterator):
        batch = real(iterator)
        calls.append(1)
        return change(dict(batch)) if len(calls) == at_call else batch

    monkeypatch.setattr(loop_utils, "next_batch", next_batch)


def test_divergence_keeps_confirmed_checkpoints_and_relaunch_and_corrupted_latest_resume(data, tmp_path, caplog):
    work = str(tmp_path / "run")
    # lr 1e30: update 1 (lr 0) gives checkpoint 1, whose state step 2's finite loss confirms; update 2
    # blows the weights up (norm inf), so that state is never saved
    with pytest.raises(loop_utils.DivergenceError) as info:
        finetune.run(small_config(data, lr=1e30), work)
    message = str(info.value)
    assert "step 2: metric 'param_norm' is inf" in message
    assert f"the last confirmed checkpoint is {os.path.join(work, 'checkpoints', '1')}" in message
    with checkpoints(work) as ck:
        assert ck.all_steps() == ck.confirmed_steps() == [1]
        kept = ck.restore(1)
    assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(kept["params"])) < 100  # sane weights

    with caplog.at_level(logging.INFO):
        result = finetune.run(small_config(data), work)  # the relaunch with a normal lr
    assert "resumed from step 1" in caplog.text
    assert result["step"] == 4 and np.isfinite(result["final_metrics"]["loss"])
    assert [r["step"] for r in loop_utils.read_metrics(work)] == [1, 2, 3, 4]  # no duplicate rows
    with checkpoints(work) as ck:
        assert ck.confirmed_steps() == [2, 3, 4]  # keep=3; the last one confirmed by one extra step
    backbone, _ = variables_lib.load_variables(os.path.join(work, "backbone"))

    # the latest checkpoint's array files are cut short: the relaunch falls back to step 3, says so,
    # and redoes step 4 exactly
    for path in glob.glob(os.path.join(work, "checkpoints", "4", "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = finetune.run(small_config(data), work)
    assert f"checkpoint {os.path.join(work, 'checkpoints', '4')} cannot be restored" in caplog.text
    assert "resumed from step 3" in caplog.text
    assert again["final_metrics"]["loss"] == result["final_metrics"]["loss"]
    jax.tree.map(np.testing.assert_array_equal, variables_lib.load_variables(os.path.join(work, "backbone"))[0], backbone)
    assert os.listdir(os.path.join(work, "checkpoints", ckpt_lib.BROKEN_DIR)) == ["4"]
    assert [r["step"] for r in loop_utils.read_metrics(work)] == [1, 2, 3, 4]


def test_nan_loss_deletes_the_checkpoint_it_condemns(data, tmp_path, monkeypatch):
    work = str(tmp_path / "nan")
    altered_batches(monkeypatch, 3, lambda b: dict(b, image=b["image"] * np.float32(np.nan)))
    with pytest.raises(loop_utils.NonFiniteError) as info:
        finetune.run(small_config(data), work)
    message = str(info.value)
    # step 3's loss comes from the state of checkpoint 2: that one goes, 1 (confirmed by step 2) stays
    assert "step 3: metric 'loss' is nan" in message and "deleted the unconfirmed checkpoints [2]" in message
    assert f"the last confirmed checkpoint is {os.path.join(work, 'checkpoints', '1')}" in message
    with checkpoints(work) as ck:
        assert ck.all_steps() == ck.confirmed_steps() == [1]


def test_an_error_mid_loop_closes_the_checkpointer_and_leaves_no_partial_save(data, tmp_path, monkeypatch):
    work = str(tmp_path / "error")
    closed = []
    real_close = ckpt_lib.TrainCheckpointer.close
    monkeypatch.setattr(ckpt_lib.TrainCheckpointer, "close", lambda self: (closed.append(1), real_close(self)))
    altered_batches(monkeypatch, 2, lambda b: dict(b, label=np.full_like(b["label"], 99)))  # a bad label
    with pytest.raises(ValueError, match="99"):
        finetune.run(small_config(data), work)  # raised while checkpoint 1 may still be writing
    assert closed == [1]
    assert not glob.glob(os.path.join(work, "checkpoints", "*orbax-checkpoint-tmp*"))
    assert os.path.exists(os.path.join(work, "checkpoints", "1", "commit_success.txt"))


def _pairs_bin(path, pairs):
    rng = np.random.default_rng(0)
    save_bin(path, rng.integers(0, 255, (2 * pairs, 32, 32, 3), dtype=np.uint8), [i % 2 == 0 for i in range(pairs)])
    return path


def test_an_evaluation_error_comes_after_the_step_is_saved_and_confirmed(data, tmp_path, monkeypatch):
    work = str(tmp_path / "eval")
    config = small_config(data)
    config.eval.bins, config.eval.nfolds, config.eval.every_steps = (_pairs_bin(str(tmp_path / "v.bin"), 4),), 2, 2

    def broken_embed(self, images, flip=True, variables=None):
        raise RuntimeError("embedding failed")

    monkeypatch.setattr(embed_lib.Embedder, "embed", broken_embed)
    with pytest.raises(finetune.EvaluationError, match=r"evaluation at step 2 failed \(RuntimeError: embedding "
                                                       r"failed\); the step's checkpoint .*checkpoints/2 is kept"):
        finetune.run(config, work)
    with checkpoints(work) as ck:
        assert ck.confirmed_steps() == [1, 2]
        assert ck.resume()[0] == 2  # a relaunch resumes from the evaluated step


def test_a_bin_with_fewer_pairs_than_folds_fails_at_start_up_naming_it(data, tmp_path):
    config = small_config(data)
    path = _pairs_bin(str(tmp_path / "tiny.bin"), 4)
    config.eval.bins = (path,)
    with pytest.raises(ConfigError, match=rf"config\.eval\.bins\[0\]='{path}' is not valid: a \.bin with at least "
                                          rf"config\.eval\.nfolds=10 pairs .* it holds 4"):
        finetune.run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing built, nothing trained
