"""Training checkpoints (orbax + Grain iterator state) and variables directories, on 8 CPU devices."""
import glob
import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from cpu_env import cpu_env
from jax.sharding import NamedSharding, PartitionSpec as P

from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train.checkpoint import TrainCheckpointer, abstract_like


def train_state(mesh, seed=0):
    """params (one tensor sharded by rows), Adam state, step, typed and raw PRNG keys, an EMA centre."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    rows, rep = NamedSharding(mesh, P(mesh.axis_names)), NamedSharding(mesh, P())
    params = {"w": jax.device_put(params["w"], rows), "b": jax.device_put(params["b"], rep)}
    opt_state = optax.adamw(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: jax.device_put(x, rows if x.shape == (16, 4) else rep), opt_state)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7 + seed), "rng": jax.random.key(seed),
            "raw_rng": jax.random.PRNGKey(seed + 1), "center": jnp.full((1, 5), 0.5 + seed, jnp.float32)}


def assert_trees_equal(a, b):
    a = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, a)
    b = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def iterator(seed=3):
    """A real Grain MapDataset pipeline: shuffle, random map, batch, iterate."""
    ds = (grain.MapDataset.range(64).seed(seed).shuffle()
          .random_map(lambda x, rng: (x, int(rng.integers(0, 1000))))
          .batch(4, drop_remainder=True))
    return iter(ds.to_iter_dataset())


def test_round_trip_sharded_state(tmp_path):
    mesh = mesh_lib.make_mesh(None)
    state = train_state(mesh)
    with TrainCheckpointer(str(tmp_path / "ckpt"), keep=2, save_every=1) as ck:
        assert ck.save(7, state)
    restored = TrainCheckpointer(str(tmp_path / "ckpt")).restore(7, abstract_like(state))
    assert_trees_equal(state, restored)
    assert restored["params"]["w"].sharding.is_equivalent_to(state["params"]["w"].sharding, 2)
    assert restored["opt_state"][0].mu["w"].sharding.is_equivalent_to(state["params"]["w"].sharding, 2)
    assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(np.asarray(jax.random.normal(restored["rng"], (3,))),
                                  np.asarray(jax.random.normal(state["rng"], (3,))))


def test_restore_onto_4_devices_from_8(tmp_path):
    state = train_state(mesh_lib.make_mesh(None), seed=1)
    with TrainCheckpointer(str(tmp_path), keep=1) as ck:
        ck.save(1, state)
    mesh4 = mesh_lib.make_mesh(None, devices=jax.devices()[:4])
    rows4, rep4 = NamedSharding(mesh4, P(mesh4.axis_names)), NamedSharding(mesh4, P())
    shardings = jax.tree.map(lambda x: rows4 if x.shape == (16, 4) else rep4, state)
    with TrainCheckpointer(str(tmp_path)) as ck:
        restored = ck.restore(None, abstract_like(state, shardings))
    assert_trees_equal(state, restored)
    w = restored["params"]["w"]
    assert len(w.sharding.device_set) == 4 and w.addressable_shards[0].data.shape == (4, 4)
    assert restored["step"].sharding.device_set == set(jax.devices()[:4])


def test_iterator_state_restored_gives_same_next_elements(tmp_path):
    it = iterator()
    for _ in range(3):
        next(it)
    state = {"step": jnp.int32(3)}
    with TrainCheckpointer(str(tmp_path), async_save=True) as ck:
        ck.save(3, state, data_iterator=it)
        expected = [next(it) for _ in range(4)]  # consumed while the save may still be writing
    fresh = iterator()
    assert not np.array_equal(next(iterator())[0], expected[0][0])  # a new iterator starts elsewhere
    with TrainCheckpointer(str(tmp_path)) as ck:
        ck.restore(3, abstract_like(state), data_iterator=fresh)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_keep_last_n_save_every_and_restart(tmp_path):
    mesh = mesh_lib.make_mesh(None)
    directory = str(tmp_path / "ck")
    config = ml_collections.ConfigDict({"model": {"dim": 8, "kind": "part_fvit"}, "crop": (112, 112)})
    metadata = {"config": config, "normalization": "[-1,1]", "color_order": "rgb"}
    ck = TrainCheckpointer(directory, keep=2, save_every=2, metadata=metadata)
    saved = [s for s in range(1, 8) if ck.save(s, train_state(mesh, seed=s))]
    assert saved == [2, 4, 6]
    assert not ck.should_save(7) and ck.should_save(8)
    assert ck.save(7, train_state(mesh, seed=7), force=True)  # e.g. on SIGTERM
    assert not ck.save(7, train_state(mesh, seed=7), force=True)  # the same step again is skipped
    ck.close()
    assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [6, 7]

    again = TrainCheckpointer(directory, keep=2, save_every=2)  # a restarted run
    assert again.latest_step() == 7 and again.all_steps() == [6, 7]
    template = train_state(mesh)
    assert_trees_equal(again.restore(None, abstract_like(template)), train_state(mesh, seed=7))
    assert_trees_equal(again.restore(6, abstract_like(template)), train_state(mesh, seed=6))
    meta = again.read_metadata()
    assert meta == {"config": {"model": {"dim": 8, "kind": "part_fvit"}, "crop": [112, 112]},
                    "normalization": "[-1,1]", "color_order": "rgb"}
    assert again.read_metadata(6) == meta
    with pytest.raises(FileNotFoundError, match="step 2"):
        again.restore(2, abstract_like(template))
    with pytest.raises(FileNotFoundError, match="data iterator"):
        again.restore(7, abstract_like(template), data_iterator=iterator())
    again.close()


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_checkpoint_kept_beside_the_latest(tmp_path, mode):
    """best_fn: the best-scoring checkpoint survives LatestN, also across a restart; unscored ones rank last."""
    mesh = mesh_lib.make_mesh(None)
    directory = str(tmp_path / "ck")
    scores = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: 0.7, 6: None}
    if mode == "min":
        scores = {s: (None if v is None else 1 - v) for s, v in scores.items()}
    ck = TrainCheckpointer(directory, keep=2, async_save=False, best_fn=lambda m: m["accuracy"], best_mode=mode)
    for s, v in scores.items():
        assert ck.save(s, train_state(mesh, seed=s), metrics=None if v is None else {"accuracy": v})
    assert ck.all_steps() == [2, 5, 6] and ck.best_step() == 2
    assert ck.metrics(2) == {"accuracy": scores[2]} and ck.metrics(6) is None
    ck.close()
    again = TrainCheckpointer(directory, keep=2, async_save=False, best_fn=lambda m: m["accuracy"], best_mode=mode)
    assert again.best_step() == 2
    assert_trees_equal(again.restore(2, abstract_like(train_state(mesh))), train_state(mesh, seed=2))
    again.save(7, train_state(mesh, seed=7), metrics={"accuracy": 0.95 if mode == "max" else 0.05})
    assert again.all_steps() == [6, 7] and again.best_step() == 7  # a new best replaces the old one
    again.close()
    with TrainCheckpointer(str(tmp_path / "plain")) as plain:
        with pytest.raises(ValueError, match="needs best_fn"):
            plain.save(1, train_state(mesh), metrics={"accuracy": 1.0})
        assert plain.best_step() is None


def test_empty_directory_and_bad_arguments(tmp_path):
    with TrainCheckpointer(str(tmp_path / "empty")) as ck:
        assert ck.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no training checkpoint"):
            ck.restore()
    with pytest.raises(ValueError, match="keep"):
        TrainCheckpointer(str(tmp_path / "x"), keep=0)
    with pytest.raises(TypeError):
        TrainCheckpointer(str(tmp_path / "y"), metadata={"f": object()})


def test_variables_directory_round_trip(tmp_path):
    mesh = mesh_lib.make_mesh(None)
    variables = {"params": train_state(mesh)["params"], "batch_stats": {"mean": jnp.arange(3.0)}}
    variables_lib.save_variables(str(tmp_path / "v"), variables, {"kind": "part_fvit", "normalization": "[-1,1]"})
    assert json.load(open(tmp_path / "v" / "metadata.json"))["kind"] == "part_fvit"
    mesh4 = mesh_lib.make_mesh(None, devices=jax.devices()[4:])
    abstract = abstract_like(variables, NamedSharding(mesh4, P()))
    loaded, meta = variables_lib.load_variables(str(tmp_path / "v"), abstract)
    assert meta["normalization"] == "[-1,1]"
    assert_trees_equal(variables, loaded)
    assert loaded["params"]["w"].sharding.device_set == set(jax.devices()[4:])
    with pytest.raises(FileNotFoundError, match="save_variables"):
        variables_lib.load_variables(str(tmp_path / "missing"))


def test_optimizer_states_of_the_builders_resume_exactly(tmp_path):
    """finetune (partition + masks + MultiSteps + injected centres optimizer) and pretrain (frozen
    last layer) states survive save/restore: the resumed updates equal the uninterrupted ones."""
    from lafs_jax.train import optim

    rng = np.random.default_rng(0)
    params = {"backbone": {"vit": {"cls_token": jnp.asarray(rng.normal(size=(1, 1, 4)), jnp.float32),
                                   "encoder": {"block_0": {"mlp": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}},
                                   "head_norm": {"scale": jnp.ones(4)}}},
              "centers": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    cfg = optim.optim_config("finetune")
    cfg.accum_steps, cfg.epochs, cfg.warmup_epochs = 2, 3, 1.0
    centers_tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    ft = optim.finetune_optimizer(params, cfg, 4, centers_tx=centers_tx)
    student = {"body": {"kernel": jnp.ones((4, 4))}, "head": {"last_layer": {"kernel": jnp.ones((4, 3))}}}
    pt = optim.pretrain_optimizer(student, optim.optim_config("pretrain"), 2, global_batch_size=256)
    grads = [jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), (params, student)) for i in range(6)]

    def run(state, grads_seq):
        upd_ft, upd_pt = jax.jit(ft.update), jax.jit(pt.update)
        for g in grads_seq:
            (p, s), (q, t) = state["ft"], state["pt"]
            u, s = upd_ft(g[0], s, p)
            v, t = upd_pt(g[1], t, q)
            state = {"ft": (optax.apply_updates(p, u), s), "pt": (optax.apply_updates(q, v), t)}
        return state

    start = {"ft": (params, ft.init(params)), "pt": (student, pt.init(student))}
    straight = run(start, grads)
    half = run(start, grads[:3])
    with TrainCheckpointer(str(tmp_path)) as ck:
        ck.save(3, half)
    with TrainCheckpointer(str(tmp_path)) as ck:
        resumed = run(ck.restore(3, abstract_like(half)), grads[3:])
    assert_trees_equal(straight, resumed)
    hp = optim.current_hyperparams(resumed["ft"][1])
    assert set(hp) >= {"learning_rate", "weight_decay", "centers/learning_rate", "momentum"}


# ---------------------------------------------------------------------------------------------
# confirmed checkpoints, retention, fallback past broken ones
# ---------------------------------------------------------------------------------------------

def _steps_on_disk(directory, sub=""):
    return sorted(int(d.split("-")[0]) for d in os.listdir(os.path.join(directory, sub)) if d.split("-")[0].isdigit())


def test_confirmation_is_durable_retention_keeps_the_newest_confirmed_and_resume_skips_unconfirmed(tmp_path):
    mesh = mesh_lib.make_mesh(None)
    directory = str(tmp_path / "ck")
    ck = TrainCheckpointer(directory, keep=1, async_save=True)
    ck.save(1, train_state(mesh, seed=1))
    ck.confirm(1, checked_at_step=2, loss=1.5)  # the save may still be writing: the marker follows it
    ck.save(2, train_state(mesh, seed=2))  # keep=1, but 2 is unconfirmed: 1 stays
    ck.save(3, train_state(mesh, seed=3))
    ck.close()
    assert _steps_on_disk(directory) == [1, 3]  # 2 was neither latest nor the newest confirmed
    marker = json.load(open(os.path.join(directory, "1", ckpt_lib.CONFIRMED_FILE)))
    assert marker["step"] == 1 and marker["checked_at_step"] == 2 and marker["loss"] == 1.5
    again = TrainCheckpointer(directory, keep=1)  # a relaunch: confirmation read back from disk
    assert again.confirmed_steps() == [1] and again.latest_confirmed_step() == 1
    step, state = again.resume(abstract_like(train_state(mesh)))
    assert step == 1
    assert_trees_equal(state, train_state(mesh, seed=1))
    assert again.all_steps() == [1]  # the unconfirmed 3 is out of the way of a new save of step 3 ...
    assert _steps_on_disk(directory, ckpt_lib.UNCONFIRMED_DIR) == [3]  # ... and set aside, not deleted
    again.save(3, train_state(mesh, seed=4))
    again.confirm(3)
    again.save(4, train_state(mesh, seed=5))
    again.close()
    assert _steps_on_disk(directory) == [3, 4]


def test_discard_unconfirmed_and_nothing_confirmed(tmp_path):
    mesh = mesh_lib.make_mesh(None)
    with TrainCheckpointer(str(tmp_path), keep=3) as ck:
        for s in (1, 2, 3):
            ck.save(s, train_state(mesh, seed=s))
        ck.confirm(1)
        assert ck.discard_unconfirmed() == [2, 3]
        assert ck.all_steps() == [1] and "resumes from step 1" in ck.describe_confirmed()
        with pytest.raises(FileNotFoundError, match="step 9"):
            ck.confirm(9)
    with TrainCheckpointer(str(tmp_path / "fresh")) as ck:
        ck.save(5, train_state(mesh))
        assert "starts from scratch" in ck.describe_confirmed()
    with TrainCheckpointer(str(tmp_path / "fresh")) as ck:  # only an unconfirmed checkpoint: from scratch
        assert ck.resume(abstract_like(train_state(mesh))) == (None, None)
        assert ck.all_steps() == []


def _truncate_array_files(step_dir):
    """Every data file of the state's OCDBT store cut to half its size (a copy or a disk that ran out)."""
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)


CORRUPTIONS = {
    "truncated array files": _truncate_array_files,
    "deleted manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "truncated iterator JSON": lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "r+b").truncate(5),
    "deleted state": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


def _two_confirmed_checkpoints(directory, mesh, nan_in_latest=False):
    """Checkpoints 1 and 2 (confirmed) with iterator states; returns the batches that follow checkpoint 1."""
    it = iterator()
    with TrainCheckpointer(directory, keep=3) as ck:
        next(it)
        ck.save(1, train_state(mesh, seed=1), data_iterator=it)
        after_1 = [next(it) for _ in range(2)]
        latest = train_state(mesh, seed=2)
        if nan_in_latest:  # what random bytes that decode to NaN look like after a restore
            latest["params"]["w"] = latest["params"]["w"].at[3, 1].set(jnp.nan)
        ck.save(2, latest, data_iterator=it)
        ck.confirm(1)
        ck.confirm(2)
    return after_1


@pytest.mark.parametrize("kind", list(CORRUPTIONS) + ["NaN in a restored array"])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, kind, caplog):
    mesh = mesh_lib.make_mesh(None)
    directory = str(tmp_path / "ck")
    after_1 = _two_confirmed_checkpoints(directory, mesh, nan_in_latest=kind.startswith("NaN"))
    if not kind.startswith("NaN"):
        CORRUPTIONS[kind](os.path.join(directory, "2"))
    fresh = iterator()
    with caplog.at_level(logging.WARNING), TrainCheckpointer(directory, keep=3) as ck:
        step, state = ck.resume(abstract_like(train_state(mesh)), data_iterator=fresh)
        assert step == 1
        assert ck.all_steps() == [1]  # the broken one no longer blocks a new save of step 2
    assert_trees_equal(state, train_state(mesh, seed=1))
    for want in after_1:  # the iterator is at checkpoint 1's position too
        np.testing.assert_array_equal(next(fresh)[0], want[0])
    broken = os.path.join(directory, "2")
    assert f"checkpoint {broken} cannot be restored" in caplog.text
    assert f"resumed from {os.path.join(directory, '1')}" in caplog.text
    assert _steps_on_disk(directory, ckpt_lib.BROKEN_DIR) == [2]
    if kind.startswith("NaN"):
        assert "NaN or inf: params/w" in caplog.text


def test_no_checkpoint_restores_lists_them_all_and_moves_nothing(tmp_path):
    mesh = mesh_lib.make_mesh(None)
    directory = str(tmp_path / "ck")
    _two_confirmed_checkpoints(directory, mesh)
    CORRUPTIONS["deleted state"](os.path.join(directory, "2"))
    CORRUPTIONS["truncated iterator JSON"](os.path.join(directory, "1"))
    with TrainCheckpointer(directory) as ck:
        with pytest.raises(ckpt_lib.CheckpointRestoreError) as info:
            ck.resume(abstract_like(train_state(mesh)), data_iterator=iterator())
    message = str(info.value)
    assert f"{os.path.join(directory, '2')}: no 'state' item" in message
    assert f"{os.path.join(directory, '1')}: {os.path.join(directory, '1', 'data', 'process_0-of-1.json')}: " \
           f"JSONDecodeError" in message
    assert _steps_on_disk(directory) == [1, 2] and not os.path.exists(os.path.join(directory, ckpt_lib.BROKEN_DIR))


# ---------------------------------------------------------------------------------------------
# two real processes (jax.distributed): one sharded state, one Grain iterator per process
# ---------------------------------------------------------------------------------------------

def _multiprocess_worker(address: str, pid: int, directory: str) -> dict:
    """Runs in each of two processes (2 CPU devices each): save, restore in a new manager, compare."""
    jax.distributed.initialize(address, 2, pid)
    mesh = mesh_lib.make_mesh(None)  # 4 devices over 2 processes
    rows = NamedSharding(mesh, P(mesh.axis_names))
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    w = jax.make_array_from_callback(full.shape, rows, lambda idx: full[idx])
    replicated = NamedSharding(mesh, P())
    state = {"w": w, "step": jax.device_put(np.int32(5), replicated),
             "rng": jax.jit(lambda: jax.random.key(3), out_shardings=replicated)()}

    def process_iterator():  # this process's slice of the data, as the input pipelines shard by process
        return iter(grain.MapDataset.range(40)[pid::2].seed(7).shuffle().batch(2).to_iter_dataset())

    it = process_iterator()
    for _ in range(pid + 1):  # the processes stand at different positions
        next(it)
    with TrainCheckpointer(directory, keep=1) as ck:
        try:
            ck.save(4, {**state, "rng": jax.random.key(3)})  # a process-local key: refused, naming it
            local_error = ""
        except ValueError as e:
            local_error = str(e)
        assert ck.save(5, state, data_iterator=it)
        expected = [next(it).tolist() for _ in range(2)]
    fresh = process_iterator()
    with TrainCheckpointer(directory, keep=1) as ck:
        restored = ck.restore(None, abstract_like(state), data_iterator=fresh)
    got = [next(fresh).tolist() for _ in range(2)]
    local_ok = all(np.array_equal(np.asarray(s.data), full[s.index]) for s in restored["w"].addressable_shards)

    # a checkpoint broken on one process only (its own iterator file) is broken for all: both fall back
    from jax.experimental import multihost_utils

    with TrainCheckpointer(directory, keep=3) as ck:
        ck.confirm(5)
        ck.save(6, state, data_iterator=it)
        ck.confirm(6)
    if pid == 1:
        os.truncate(os.path.join(directory, "6", "data", "process_1-of-2.json"), 5)
    multihost_utils.sync_global_devices("iterator file of process 1 truncated")
    with TrainCheckpointer(directory, keep=3) as ck:
        resumed, _ = ck.resume(abstract_like(state), data_iterator=process_iterator())

    result = {"pid": pid, "devices": jax.device_count(), "expected": expected, "got": got, "local_ok": local_ok,
              "files": sorted(os.listdir(os.path.join(directory, "5", "data"))), "local_error": local_error,
              "resumed": resumed}
    jax.distributed.shutdown()
    return result


def test_two_processes_save_and_restore_their_own_iterator_state(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = cpu_env(2, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), address, str(i), str(tmp_path / "ck")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["devices"] == 4 and r["local_ok"]
        assert r["got"] == r["expected"]
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(r["files"])
        assert "state leaf 'rng' is a process-local jax.Array" in r["local_error"]
        assert r["resumed"] == 5  # process 0's files of step 6 were fine: it fell back with process 1
    assert results[0]["expected"] != results[1]["expected"]  # each process resumed its own stream


if __name__ == "__main__":  # a worker of test_two_processes_save_and_restore_their_own_iterator_state
    import sys

    print(json.dumps(_multiprocess_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])))


# ---------------------------------------------------------------------------------------------
# device-count-free variables directories; clear restore errors
# ---------------------------------------------------------------------------------------------

def test_variables_are_saved_as_host_arrays_and_loaded_onto_any_mesh(tmp_path):
    """Sharded device arrays in, numpy on disk (no sharding recorded): loaded back as numpy, onto 3
    devices, or only in part; a directory of sharded device arrays (what fine-tuning wrote before)
    loads the same way, never against the sharding that wrote it."""
    mesh = mesh_lib.make_mesh(None)
    variables = {"params": train_state(mesh)["params"], "classifier": {"centers": jnp.ones((8, 4))}}
    assert variables["params"]["w"].sharding.spec == P(mesh.axis_names)
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    variables_lib.save_variables(new, variables, {"kind": "backbone"})
    os.makedirs(old)
    with ocp.StandardCheckpointer() as ckptr:  # the layout of a directory written before issue 17
        ckptr.save(os.path.join(old, variables_lib.VARIABLES_ITEM), variables)
    stored = ocp.PyTreeCheckpointer().metadata(os.path.join(new, variables_lib.VARIABLES_ITEM)).item_metadata.tree
    assert stored["params"]["w"].sharding is None  # host arrays: nothing of the 8-device mesh
    mesh3 = mesh_lib.make_mesh(None, devices=jax.devices()[:3])
    for directory in (new, old):
        assert variables_lib.stored_structure(directory)["params"]["w"] == jax.ShapeDtypeStruct((16, 4), jnp.float32)
        host, _ = variables_lib.load_variables(directory)
        assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))
        assert_trees_equal(host, variables)
        abstract = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables["params"])}
        placed, _ = variables_lib.load_variables(directory, abstract, NamedSharding(mesh3, P()))  # part of the tree
        assert set(placed) == {"params"} and placed["params"]["w"].sharding.device_set == set(jax.devices()[:3])
        assert_trees_equal(placed["params"], variables["params"])
    assert variables_lib.read_metadata(new) == {"kind": "backbone"}
    wrong = {"params": {"w": jax.ShapeDtypeStruct((12, 4), jnp.float32)}}
    with pytest.raises(ValueError, match=r"new: 'params/w' is stored with shape \(16, 4\), the model needs \(12, 4\)"):
        variables_lib.load_variables(new, wrong)
    with pytest.raises(ValueError, match=r"no entry 'params/q'"):
        variables_lib.load_variables(new, {"params": {"q": jax.ShapeDtypeStruct((4,), jnp.float32)}})


def test_a_failed_restore_is_one_clear_error(tmp_path, capfd):
    """A shape mismatch names the checkpoint, the arrays and both shapes before orbax reads anything
    (orbax's own failure printed dozens of 'Event loop is closed' tracebacks); so does a missing array."""
    mesh = mesh_lib.make_mesh(None)
    state = train_state(mesh)
    with TrainCheckpointer(str(tmp_path / "ck")) as ck:
        ck.save(7, state)
        ck.wait()
        target = abstract_like(state)
        target["params"]["b"] = jax.ShapeDtypeStruct((5,), jnp.float32, sharding=state["params"]["b"].sharding)
        with pytest.raises(ValueError) as e:
            ck.restore(7, target)
        message = str(e.value)
        assert str(tmp_path / "ck" / "7") in message
        assert "array 'params/b' is stored with shape (4,), this run needs (5,)" in message
        target = abstract_like(state)
        target["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=state["params"]["b"].sharding)
        with pytest.raises(ValueError, match=r"1 array\(s\) of this run's state are not in it, e.g. 'extra'"):
            ck.restore(7, target)
        assert ck.stored_arrays(7)["params/w"] == ((16, 4), np.dtype("float32"))
    captured = capfd.readouterr()
    assert "Event loop is closed" not in captured.out + captured.err


def test_iterator_state_of_another_process_count_is_a_clear_error(tmp_path):
    it = iterator()
    next(it)
    with TrainCheckpointer(str(tmp_path)) as ck:
        ck.save(1, {"step": jnp.int32(1)}, data_iterator=it)
    data = tmp_path / "1" / ckpt_lib.DATA_ITEM
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as if 2 processes had saved
    with TrainCheckpointer(str(tmp_path)) as ck:
        with pytest.raises(FileNotFoundError, match=r"process_0-of-2.json.*none for this process "
                                                    r"\(process_0-of-1.json\).*same process count"):
            ck.restore(1, abstract_like({"step": jnp.int32(1)}), data_iterator=iterator())
