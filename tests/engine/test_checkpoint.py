"""Checkpoints in a single process: bit-identical round trips, loading into
templates, exact resume, pruning, the ``latest`` pointer, a save killed
half-way (SIGKILL in a subprocess), damage of every file kind detected on
load (checksums) and passed over on resume, failed writes (no space left,
read-only) explained. Several ranks: test_checkpoint_distributed.py."""
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rlhf_engine import checkpoint
from rlhf_engine.checkpoint import (CheckpointError, CheckpointSaveError, capture_rng, latest_checkpoint,
                                           list_checkpoints, load_checkpoint, restore_rng, save_checkpoint)
from tests.helpers import same_bits

REPO = Path(__file__).resolve().parents[2]


def special_values(dtype):
    x = torch.randn(6, 5).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    return x


def test_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    big = special_values(torch.float32)
    tied = torch.randn(3, 4)
    state = {
        "f32": big, "bf16": special_values(torch.bfloat16), "i64": torch.arange(-3, 4), "bool": torch.rand(7) > 0.5,
        "transposed": big.t(), "strided": big[::2, 1::2], "rows": big[2:4], "empty": big[3:3],
        "tied_a": tied, "tied_b": tied, "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    objects = {"step": 7, "lr": [1e-3, 3e-4], "nested": {"t": torch.ones(2, dtype=torch.bfloat16), "s": "x"},
               "shape": torch.Size([2, 3]), "none": None, "tuple": (1, 2.0, "three")}
    path = save_checkpoint(tmp_path, 7, {"policy": state}, objects)
    assert path == tmp_path / "step-00000007"
    tensors, loaded = load_checkpoint(path)
    got = tensors["policy"]
    assert list(got) == list(state)
    for key, value in state.items():
        assert same_bits(got[key], value), key
    assert got["tied_a"] is got["tied_b"]
    assert loaded["nested"]["t"].dtype == torch.bfloat16
    assert {k: v for k, v in loaded.items() if k != "nested"} == {k: v for k, v in objects.items() if k != "nested"}


def tied_model(seed, tied=True):
    torch.manual_seed(seed)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    if tied:
        model.head.weight = model.emb.weight
    return model


def test_tied_module_reloads(tmp_path):
    model = tied_model(0)
    path = save_checkpoint(tmp_path, 1, {"policy": model.state_dict()}, {})
    assert json.loads((path / "manifest.json").read_text())["tensors"]["policy"]["aliases"] == {
        "head.weight": "emb.weight"}  # written once
    tensors, _ = load_checkpoint(latest_checkpoint(tmp_path))
    fresh = tied_model(1)
    fresh.load_state_dict(tensors["policy"])
    assert same_bits(fresh.head.weight, model.emb.weight)
    assert fresh.head.weight is fresh.emb.weight


def test_load_into_templates_fills_them_in_place(tmp_path):
    model = tied_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    sd_model, sd_optim = get_state_dict(model, optimizer)
    save_checkpoint(tmp_path, 1, {"model": sd_model, "optim": sd_optim}, {"step": 1})

    fresh = tied_model(1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)  # no state yet, another lr
    templates = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_optimizer)))
    tensors, objects = load_checkpoint(latest_checkpoint(tmp_path), templates)
    assert tensors is templates and objects == {"step": 1}
    set_state_dict(fresh, fresh_optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
    assert fresh.head.weight is fresh.emb.weight and same_bits(fresh.emb.weight, model.emb.weight)
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-2
    for name, want in sd_optim["state"]["emb.weight"].items():
        assert same_bits(fresh_optimizer.state[fresh.emb.weight][name], want), name

    untied = tied_model(2, tied=False)  # both keys filled from the one stored tensor
    load_checkpoint(latest_checkpoint(tmp_path), {"model": untied.state_dict()})
    assert same_bits(untied.head.weight, model.emb.weight) and same_bits(untied.emb.weight, model.emb.weight)


def test_load_into_templates_names_what_the_checkpoint_lacks(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2), "b": torch.ones(1)}}, {})
    with pytest.raises(ValueError, match="has no 'critic' \\(it has 'model'\\)"):
        load_checkpoint(path, {"model": {"w": torch.zeros(2)}, "critic": {"v": torch.zeros(1)}})
    with pytest.raises(ValueError, match="lacks 2 key\\(s\\) the templates have: model.x.y, model.z"):
        load_checkpoint(path, {"model": {"w": torch.zeros(2), "x": {"y": torch.zeros(1)}, "z": 3}})


def make_run(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def train(model, optimizer, gen, steps):
    """Steps that draw from every generator: numpy/python for the batch size,
    ``gen`` for data, the global torch RNG for dropout."""
    for _ in range(steps):
        rows = random.randint(3, 6) + int(np.random.randint(0, 3))
        x = torch.randn(rows, 8, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_resume_matches_uninterrupted_run(tmp_path):
    random.seed(0)
    np.random.seed(0)
    model, optimizer = make_run(seed=0)
    gen = torch.Generator().manual_seed(1)
    train(model, optimizer, gen, 3)
    save_checkpoint(tmp_path, 3, {"policy": model.state_dict()},
                    {"optim": optimizer.state_dict(), "rng": capture_rng([gen])})
    train(model, optimizer, gen, 3)

    fresh, fresh_optimizer = make_run(seed=5)  # other weights, other RNG positions
    other_gen = torch.Generator().manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    tensors, objects = load_checkpoint(latest_checkpoint(tmp_path))
    fresh.load_state_dict(tensors["policy"])
    fresh_optimizer.load_state_dict(objects["optim"])
    restore_rng(objects["rng"], [other_gen])
    train(fresh, fresh_optimizer, other_gen, 3)
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert same_bits(got, want), name


def test_rng_round_trip():
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]

    def draw():
        return (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist(),
                [torch.randn(2, generator=g).tolist() for g in gens],
                torch.rand(2, device="cuda").tolist() if torch.cuda.is_available() else None)

    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state
    state = capture_rng(gens)
    first = draw()
    assert draw() != first
    restore_rng(state, gens)
    assert draw() == first
    with pytest.raises(ValueError, match="generators"):
        restore_rng(state, gens[:1])


def test_keep_prunes_oldest_but_never_the_new_one(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"m": {"w": torch.full((2,), float(step))}}, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    # A lower step written last (a resumed run) is kept; the rest down to keep=1 go.
    save_checkpoint(tmp_path, 2, {"m": {"w": torch.zeros(2)}}, {"step": 2}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_resaving_a_step_replaces_it(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    save_checkpoint(tmp_path, 4, {"m": {"w": torch.zeros(3)}, "old": {"x": torch.ones(1)}}, {"v": 1})
    path = save_checkpoint(tmp_path, 4, {"m": {"w": torch.ones(3)}}, {"v": 2})
    tensors, objects = load_checkpoint(path)
    assert list(tensors) == ["m"] and torch.equal(tensors["m"]["w"], torch.ones(3)) and objects == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004"]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "objects.pt", "tensors"]


def test_latest_pointer_and_fallback(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {}, {"step": step}, keep=3)
    assert (tmp_path / "latest").read_text() == "step-00000003\n"
    (tmp_path / "latest").write_text("step-00000002\n")  # the pointer wins over a higher step
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    (tmp_path / "step-00000002" / "objects.pt").unlink()  # it now names an incomplete one
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    (tmp_path / "latest").unlink()
    (tmp_path / "step-00000003" / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"


def test_stale_tmp_is_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, {"m": {"w": torch.ones(2)}}, {})
    # A complete-looking checkpoint left in a temporary folder by a dead process.
    stale = tmp_path / ".tmp-step-00000009-12345"
    save_checkpoint(tmp_path / "elsewhere", 9, {"m": {"w": torch.zeros(2)}}, {})
    os.replace(tmp_path / "elsewhere" / "step-00000009", stale)
    (tmp_path / ".tmp-latest-12345").write_text("step-00000009\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    save_checkpoint(tmp_path, 2, {"m": {"w": torch.ones(2)}}, {})
    assert not list(tmp_path.glob(".tmp-*"))


def test_load_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    path = save_checkpoint(tmp_path, 1, {"policy": {"w": torch.ones(4)}}, {})
    with pytest.raises(ValueError, match="manifest.json"):
        load_checkpoint(tmp_path)  # the root, not a checkpoint folder
    [shard] = (path / "tensors").glob("*.distcp")
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=f"tensors/{shard.name} has 10 bytes"):
        load_checkpoint(path)
    (path / "tensors" / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"step-00000001: tensors/.metadata missing"):
        load_checkpoint(path)


def test_bad_arguments_write_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"objects\['kl'\]\['coef'\] is a float64"):
        save_checkpoint(tmp_path, 1, {}, {"kl": {"coef": np.float64(0.1)}})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, {}, {}, keep=0)
    with pytest.raises(ValueError, match="entry name"):
        save_checkpoint(tmp_path, 1, {"../x": {}}, {})
    with pytest.raises(ValueError, match=r"tensors\['optim'\]\['state'\]: key 0 is not a str"):
        save_checkpoint(tmp_path, 1, {"optim": {"state": {0: {"step": torch.ones(())}}}}, {})
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def damage(path, how):
    """Damage the file ``path``: ``flipped`` bits (same size: 4 bytes mid-file;
    in a manifest, one bit of the key "w", which leaves valid JSON),
    ``truncated`` to half, same-size ``garbage``, or ``missing``."""
    data = path.read_bytes()
    if how == "flipped":
        at, n = (data.find(b'"w"') + 1, 1) if path.name == "manifest.json" else (len(data) // 2, 4)
        data = data[:at] + bytes(b ^ 0x01 for b in data[at:at + n]) + data[at + n:]
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "garbage":
        data = random.Random(0).randbytes(len(data))
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(data)


CHECKSUM, SIZE, MISSING = "does not match its sha256 checksum", r"has \d+ bytes, the manifest says \d+", "missing"
FAULTS = [(name, how, reason) for name in ("tensors/__0_0.distcp", "tensors/.metadata", "objects.pt")
          for how, reason in [("flipped", CHECKSUM), ("truncated", SIZE), ("garbage", CHECKSUM), ("missing", MISSING)]
          ] + [("manifest.json", "flipped", "does not match its own sha256 checksum"),
               ("manifest.json", "truncated", "is not valid JSON"), ("manifest.json", "garbage", "is not valid JSON")]


@pytest.mark.parametrize("name, how, reason", FAULTS, ids=[f"{name}-{how}" for name, how, _ in FAULTS])
def test_damage_is_detected_on_load_naming_the_file(tmp_path, name, how, reason):
    save_checkpoint(tmp_path, 1, {"policy": {"w": torch.arange(4096.0)}}, {"step": 1})
    path = save_checkpoint(tmp_path, 2, {"policy": {"w": torch.arange(4096.0) + 1}}, {"step": 2})
    damage(path / name, how)
    for templates in (None, {"policy": {"w": torch.zeros(4096)}}):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path, templates)
        message = str(caught.value)
        assert message.startswith(f"damaged checkpoint {path}: {name} ") and re.search(reason, message), message
        assert "weights_only" not in message
    # Resuming passes over it, saying which file is wrong, to the intact step 1.
    skipped = []
    assert latest_checkpoint(tmp_path, on_skip=lambda *skip: skipped.append(skip)) == tmp_path / "step-00000001"
    [(where, why)] = skipped
    assert where == path and why.startswith(f"{name} ") and re.search(reason, why), why
    assert load_checkpoint(tmp_path / "step-00000001")[1] == {"step": 1}


LATEST_FAULTS = [("flipped", "latest names step-00111102, which does not exist"),
                 ("truncated", r"latest holds b'step-00', not the name of a checkpoint \(damaged\)"),
                 ("garbage", r"latest holds b'.*', not the name of a checkpoint \(damaged\)")]


@pytest.mark.parametrize("how, reason", LATEST_FAULTS, ids=[how for how, _ in LATEST_FAULTS])
def test_damaged_latest_pointer_is_reported(tmp_path, how, reason):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"m": {"w": torch.ones(2)}}, {"step": step})
    damage(tmp_path / "latest", how)
    skipped = []
    assert latest_checkpoint(tmp_path, on_skip=lambda *skip: skipped.append(skip)) == tmp_path / "step-00000002"
    [(where, why)] = skipped
    assert where == tmp_path / "latest" and re.fullmatch(reason, why, re.DOTALL), why
    assert list_checkpoints(tmp_path) == [(tmp_path / "latest", None, why), (tmp_path / "step-00000002", 2, None),
                                          (tmp_path / "step-00000001", 1, None)]


def test_manifest_holds_each_files_sha256(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"m": {"w": torch.ones(8)}}, {"step": 3})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files == ["objects.pt", "tensors/.metadata", "tensors/__0_0.distcp"]
    for name, record in manifest["files"].items():  # plain sha256: sha256sum checks them by hand
        data = (path / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_list_checkpoints_tells_none_from_all_damaged(tmp_path):
    assert list_checkpoints(tmp_path / "absent") == [] and list_checkpoints(tmp_path) == []
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"m": {"w": torch.full((64,), float(step))}}, {"step": step}, keep=3)
    damage(tmp_path / "step-00000003" / "tensors" / "__0_0.distcp", "flipped")
    (tmp_path / "step-00000002" / "manifest.json").unlink()
    statuses = list_checkpoints(tmp_path)
    assert [(s.path.name, s.step) for s in statuses] == [("step-00000003", 3), ("step-00000002", 2),
                                                         ("step-00000001", 1)]
    assert CHECKSUM in statuses[0].problem and statuses[1].problem == "manifest.json missing"
    assert statuses[2].problem is None
    # Without verify only sizes count: the flipped bits go unnoticed until load_checkpoint verifies.
    assert latest_checkpoint(tmp_path, verify=False) == tmp_path / "step-00000003"
    assert [s.problem is None for s in list_checkpoints(tmp_path, verify=False)] == [True, False, True]
    damage(tmp_path / "step-00000001" / "objects.pt", "garbage")
    skipped = []
    assert latest_checkpoint(tmp_path, on_skip=lambda *skip: skipped.append(skip)) is None
    assert [where.name for where, _ in skipped] == ["step-00000003", "step-00000002", "step-00000001"]


def test_format_2_checkpoint_loads_with_a_warning(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"m": {"w": torch.arange(5.0)}}, {"step": 1})
    manifest = json.loads((path / "manifest.json").read_text())  # as the previous version wrote it
    del manifest["manifest_sha256"]
    manifest.update(format_version=2, files={name: r["size"] for name, r in manifest["files"].items()})
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert latest_checkpoint(tmp_path) == path
    with pytest.warns(UserWarning, match=f"checkpoint {path} has no checksums .*checked by size only"):
        tensors, objects = load_checkpoint(path)
    assert torch.equal(tensors["m"]["w"], torch.arange(5.0)) and objects == {"step": 1}
    manifest["format_version"] = 4
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json is of format version 4; this rlhf_engine reads"):
        load_checkpoint(path)


TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def fail_in_dcp_writer(monkeypatch, error):
    def write_item(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch.distributed.checkpoint.filesystem, "_write_item", write_item)


def fail_in_objects(monkeypatch, error, free=None):
    """torch.save of objects.pt writes a little, then raises ``error``; ``free``: the free bytes disk_usage reports."""
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith("objects.pt"):
            f.write(b"PK\x03\x04")
            raise error
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", failing_save)
    if free is not None:
        usage = shutil.disk_usage("/")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def fail_in_manifest(monkeypatch, error):
    write_bytes = checkpoint._write_bytes

    def failing(path, data):
        if path.name == "manifest.json":
            raise error
        write_bytes(path, data)
    monkeypatch.setattr(checkpoint, "_write_bytes", failing)


def fail_in_mkdir(monkeypatch, error):
    def mkdir(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(Path, "mkdir", mkdir)


WRITE_FAILURES = {  # id: (how the write fails, what the message says, the file it names, the errno)
    "shard-ENOSPC": (lambda mp: fail_in_dcp_writer(mp, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
                     r"no space left on the device \(\[Errno 28\] No space left on device\)", "/tensors",
                     errno.ENOSPC),
    "objects-disk-full": (lambda mp: fail_in_objects(mp, RuntimeError(TORCH_SHORT_WRITE), free=4096),
                          r"no space left on the device \(4096 bytes free; \[enforce fail", "/objects.pt",
                          errno.ENOSPC),
    "objects-short-write": (lambda mp: fail_in_objects(mp, RuntimeError(TORCH_SHORT_WRITE)),
                            r"a write came up short \(.*unexpected pos 704 vs 598\): the device may be full",
                            "/objects.pt", None),
    "manifest-EIO": (lambda mp: fail_in_manifest(mp, OSError(errno.EIO, os.strerror(errno.EIO))),
                     r": \[Errno 5\] Input/output error", "/manifest.json", errno.EIO),
    "folder-EROFS": (lambda mp: fail_in_mkdir(mp, OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/out")),
                     r"the file system is read-only \(\[Errno 30\] Read-only file system: '/ro/out'\)", "/ro/out",
                     errno.EROFS),
    "folder-EACCES": (lambda mp: fail_in_mkdir(mp, PermissionError(errno.EACCES, "Permission denied", "/out")),
                      r"permission denied \(\[Errno 13\] Permission denied: '/out'\)", "/out", errno.EACCES),
}


@pytest.mark.parametrize("failure", list(WRITE_FAILURES))
def test_failed_write_says_what_and_keeps_previous(tmp_path, monkeypatch, failure):
    save_checkpoint(tmp_path, 1, {"m": {"w": torch.ones(2)}}, {"v": 1})
    fail, reason, target, code = WRITE_FAILURES[failure]
    fail(monkeypatch)
    with pytest.raises(CheckpointSaveError) as caught:
        save_checkpoint(tmp_path, 2, {"m": {"w": torch.zeros(2)}}, {"v": 2})
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"cannot save checkpoint step 2 under {tmp_path}: ") and re.search(reason, message)
    assert isinstance(caught.value, OSError) and caught.value.errno == code
    assert re.search(rf"\(writing [^)]*{re.escape(target)}[^)]*\); the previous checkpoint "
                     rf"{re.escape(str(tmp_path / 'step-00000001'))} is intact$", message), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"v": 1}


def test_failed_first_save_says_there_is_no_earlier_checkpoint(tmp_path, monkeypatch):
    fail_in_dcp_writer(monkeypatch, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    with pytest.raises(CheckpointSaveError, match=r"no space left on the device \(\[Errno 122\] Disk quota .*; "
                                                  f"there is no earlier checkpoint under {tmp_path}$"):
        save_checkpoint(tmp_path, 1, {"m": {"w": torch.ones(2)}}, {})
    assert not list(tmp_path.iterdir())


def test_torch_writer_failing_for_real(tmp_path):
    """A real short write (a file size limit: torch's writer reports it as the
    RuntimeError of a full disk) in a child process."""
    save_checkpoint(tmp_path, 1, {"m": {"w": torch.ones(2)}}, {"v": 1})
    child = textwrap.dedent("""
        import resource, signal, sys, torch
        from rlhf_engine.checkpoint import CheckpointSaveError, save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        try:
            save_checkpoint(sys.argv[1], 2, {"m": {"w": torch.ones(4096)}}, {"v": 2})
        except CheckpointSaveError as error:
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"cannot save checkpoint step 2 under {tmp_path}: a write came up short \(.*unexpected pos "
                        rf".*\): the device may be full .*; the previous checkpoint .*step-00000001 is intact\n",
                        done.stdout), done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


# A child process that saves step 2 and SIGKILLs itself at a chosen point.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from rlhf_engine import checkpoint

    root, point = sys.argv[1], sys.argv[2]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "during-tensors":  # the first fsync is DCP's, of its first data file
        os.fsync = die
    elif point == "after-tensors":
        checkpoint._write_objects = die
    else:
        checkpoint._write_latest = die
    tensors = {"policy": {"w": torch.full((4096,), 2.0)}, "critic": {"v": torch.full((8,), 2.0)}}
    checkpoint.save_checkpoint(root, 2, tensors, {"step": 2})
""")


@pytest.mark.parametrize("point", ["during-tensors", "after-tensors", "before-latest"])
def test_killed_save_keeps_previous_checkpoint(tmp_path, point):
    policy, critic = torch.randn(4096), torch.randn(8)
    save_checkpoint(tmp_path, 1, {"policy": {"w": policy}, "critic": {"v": critic}}, {"step": 1})
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), point], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    if point != "before-latest":
        [tmp] = tmp_path.glob(".tmp-step-00000002-*")
        assert [p.name for p in tmp.iterdir()] == ["tensors"]
        assert (tmp / "tensors" / ".metadata").exists() == (point == "after-tensors")
    else:  # renamed into place, but never named by latest
        assert (tmp_path / "step-00000002" / "manifest.json").exists()

    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "step-00000001"
    tensors, objects = load_checkpoint(path)
    assert same_bits(tensors["policy"]["w"], policy) and same_bits(tensors["critic"]["v"], critic)
    assert objects == {"step": 1}

    # The resumed run writes step 2 again: it replaces the leftover, cleans up.
    save_checkpoint(tmp_path, 2, {"policy": {"w": policy}}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"step": 2}
