"""Checkpoints of any shard count in one process, resharding, Hugging Face format in and out, and bad input."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import mp_worker
from llama import Llama, convert
from llama.config import ModelArgs
from llama.formats import open_checkpoint
from llama.formats.base import load_shard
from llama.formats.hf import ffn_params, meta_to_hf_model
from llama.tiny import make_checkpoint

transformers = pytest.importorskip("transformers")
from test_model import hf_model_from_meta  # noqa: E402  the independent Meta -> HF conversion, as the oracle


def same_tensors(dir_a, dir_b):
    """Both checkpoints hold the same keys and bit-identical tensors, shard by shard."""
    names = sorted(n for n in os.listdir(dir_a) if n.endswith(".pth"))
    assert names == sorted(n for n in os.listdir(dir_b) if n.endswith(".pth"))
    for name in names:
        a, b = load_shard(os.path.join(dir_a, name)), load_shard(os.path.join(dir_b, name))
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)


def equivalent_params(a: dict, b: dict, vocab_size: int):
    """The same model: every ModelArgs field that shapes it, with Meta's -1 vocab read as the tokenizer's."""
    args = [ModelArgs.from_params({**p, "vocab_size": p["vocab_size"] if p["vocab_size"] != -1 else vocab_size})
            for p in (a, b)]
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "ffn_hidden_dim")
    return all(getattr(args[0], f) == getattr(args[1], f) for f in fields)


def our_logits(ckpt_dir, tokenizer_path=None):
    return mp_worker.run(str(ckpt_dir), tokenizer_path)


@pytest.fixture(scope="module")
def reference(tiny_dir, tokenizer_path):
    """Logits and greedy tokens of the 1-shard checkpoints in this process."""
    return {config: our_logits(tiny_dir / f"{config}-mp1", tokenizer_path) for config in ("mha", "gqa")}


def assert_same_results(result, expected, atol=1e-5):
    assert (result["logits"] - expected["logits"]).abs().max().item() <= atol
    assert result["tokens"] == expected["tokens"]


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_two_shards_in_one_process_match_one_shard(tiny_dir, tokenizer_path, reference, config):
    assert_same_results(our_logits(tiny_dir / f"{config}-mp2", tokenizer_path), reference[config])


def test_reshard_down_and_up_is_bit_exact(tiny_dir, tokenizer_path, reference, tmp_path):
    convert.reshard(str(tiny_dir / "mha-mp2"), str(tmp_path / "mp1"), model_parallel_size=1)
    convert.reshard(str(tmp_path / "mp1"), str(tmp_path / "mp2"), model_parallel_size=2)
    same_tensors(tmp_path / "mp1", tiny_dir / "mha-mp1")
    same_tensors(tmp_path / "mp2", tiny_dir / "mha-mp2")
    assert json.loads((tmp_path / "mp2" / "params.json").read_text()) == json.loads(
        (tiny_dir / "mha-mp2" / "params.json").read_text())
    # the tokenizer beside the source comes along, so tokenizer_path can be left out
    assert_same_results(our_logits(tmp_path / "mp1"), reference["mha"])
    for line in (tmp_path / "mp2" / "checklist.chk").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.md5((tmp_path / "mp2" / name).read_bytes()).hexdigest() == digest


def test_reshard_beyond_kv_heads_replicates_and_merges_back(tiny_dir, tmp_path):
    convert.reshard(str(tiny_dir / "gqa-mp1"), str(tmp_path / "mp4"), model_parallel_size=4)
    shards = [load_shard(str(tmp_path / "mp4" / f"consolidated.0{i}.pth")) for i in range(4)]
    wk = [s["layers.0.attention.wk.weight"] for s in shards]  # 2 KV heads of 8 rows, each on 2 shards
    assert all(w.shape == (8, 64) for w in wk) and torch.equal(wk[0], wk[1]) and torch.equal(wk[2], wk[3])
    assert shards[0]["layers.0.attention.wq.weight"].shape == (16, 64)
    convert.reshard(str(tmp_path / "mp4"), str(tmp_path / "mp1"), model_parallel_size=1)
    same_tensors(tmp_path / "mp1", tiny_dir / "gqa-mp1")


@pytest.fixture(scope="module")
def hf_export(tiny_dir, tmp_path_factory):
    """to_hf of each 2-shard checkpoint (the tokenizer found beside it)."""
    root = tmp_path_factory.mktemp("hf-export")
    for config in ("mha", "gqa"):
        convert.to_hf(str(tiny_dir / f"{config}-mp2"), str(root / config))
    return root


def test_meta_to_hf_to_meta_is_bit_exact(tiny_dir, hf_export, tmp_path):
    for config in ("mha", "gqa"):
        convert.from_hf(str(hf_export / config), str(tmp_path / config))
        same_tensors(tmp_path / config, tiny_dir / f"{config}-mp1")
        params = [json.loads((d / "params.json").read_text()) for d in (tmp_path / config, tiny_dir / f"{config}-mp1")]
        assert equivalent_params(*params, vocab_size=512)
    convert.from_hf(str(hf_export / "gqa"), str(tmp_path / "gqa-mp2"), model_parallel_size=2)
    same_tensors(tmp_path / "gqa-mp2", tiny_dir / "gqa-mp2")


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_transformers_loads_our_export(hf_export, reference, config):
    hf_dir = hf_export / config
    assert sorted(os.listdir(hf_dir)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.model"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.bos_token_id == 1
    with torch.inference_mode():
        logits = model(mp_worker.LOGIT_TOKENS).logits
    assert (logits - reference[config]["logits"]).abs().max().item() <= 1e-4


def test_export_keeps_dtype_and_splits_files(tmp_path, tokenizer_path):
    make_checkpoint(str(tmp_path / "bf16"), {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32,
                                             "vocab_size": -1}, 512, dtype=torch.bfloat16)
    convert.to_hf(str(tmp_path / "bf16"), str(tmp_path / "hf"), tokenizer_path, max_shard_bytes=100_000)
    files = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors.index.json" in files and "model-00002-of-00004.safetensors" in files
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.dtype == torch.bfloat16
    ours = Llama.build(str(tmp_path / "hf"), None, 64, 4, device="cpu", dtype="bf16").model
    assert ours.output.weight.dtype == torch.bfloat16
    convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    same_tensors(tmp_path / "back", tmp_path / "bf16")


@pytest.fixture(scope="module")
def saved_by_transformers(tiny_dir, tokenizer_path, tmp_path_factory):
    """The gqa model converted by test_model's independent code, saved by transformers (safetensors, sharded with
    an index) and as a pytorch_model.bin (what transformers 4 wrote with safe_serialization=False)."""
    root = tmp_path_factory.mktemp("hf-saved")
    model = hf_model_from_meta(str(tiny_dir / "gqa-mp1"), 512)
    model.save_pretrained(str(root / "safetensors"), max_shard_size="200KB")
    model.config.save_pretrained(str(root / "bin"))
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    for name in ("safetensors", "bin"):
        shutil.copy(tokenizer_path, root / name / "tokenizer.model")
    with torch.inference_mode():
        logits = model(mp_worker.LOGIT_TOKENS).logits
    return root, logits


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_we_load_what_transformers_saved(saved_by_transformers, reference, layout):
    root, hf_logits = saved_by_transformers
    if layout == "safetensors":
        assert "model.safetensors.index.json" in os.listdir(root / layout)
    result = our_logits(root / layout)  # tokenizer.model from the directory
    assert (result["logits"] - hf_logits).abs().max().item() <= 1e-4
    assert_same_results(result, reference["gqa"])


def test_meta_to_hf_model_matches_independent_conversion(tiny_dir):
    model = meta_to_hf_model(open_checkpoint(str(tiny_dir / "mha-mp2")), dtype=torch.float32)
    oracle = hf_model_from_meta(str(tiny_dir / "mha-mp1"), 512)
    with torch.inference_mode():
        assert torch.equal(model(mp_worker.LOGIT_TOKENS).logits, oracle(mp_worker.LOGIT_TOKENS).logits)


def test_ffn_params_reproduce_intermediate_size():
    assert ffn_params(4096, 11008) == (256, None)  # 7B
    assert ffn_params(8192, 28672) == (4096, 1.3)  # 70B
    for dim in (64, 4096, 5120, 8192):
        for hidden in (11008, 13824, 14336, 28672, 100, 192, 224, 1000, 3 * dim, 4 * dim + 1):
            multiple_of, multiplier = ffn_params(dim, hidden)
            args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            assert args.ffn_hidden_dim == hidden, (dim, hidden)


# Bad input: each gets an error that names the file and says what is wrong.


def edit_shard(ckpt_dir, index, edit):
    path = ckpt_dir / f"consolidated.{index:02d}.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_shards_that_do_not_belong_together(tiny_dir, tmp_path):
    keys = copy_of(tiny_dir / "mha-mp2", tmp_path / "keys")
    edit_shard(keys, 1, lambda s: s.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match="consolidated.01.pth has different keys from .*consolidated.00.pth"):
        convert.reshard(str(keys), str(tmp_path / "out"), 1)

    shapes = copy_of(tiny_dir / "mha-mp2", tmp_path / "shapes")
    edit_shard(shapes, 1, lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(32, 48)}))
    with pytest.raises(ValueError, match="consolidated.01.pth and .* disagree on the shape of layers.0.attention.wq"):
        convert.reshard(str(shapes), str(tmp_path / "out"), 1)

    gap = copy_of(tiny_dir / "mha-mp2", tmp_path / "gap")
    os.rename(gap / "consolidated.01.pth", gap / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match="missing consolidated.01.pth, which its checklist.chk lists"):
        convert.reshard(str(gap), str(tmp_path / "out"), 1)
    (gap / "checklist.chk").unlink()  # without a checklist, the gap in the numbering tells
    with pytest.raises(FileNotFoundError, match="missing shard\\(s\\) \\['consolidated.01.pth'\\]"):
        convert.reshard(str(gap), str(tmp_path / "out"), 1)

    three = copy_of(tiny_dir / "gqa-mp2", tmp_path / "three")
    shutil.copy(three / "consolidated.01.pth", three / "consolidated.02.pth")
    with pytest.raises(ValueError, match="holds 3 shards, but its params.json .* cannot be split 3 ways"):
        convert.reshard(str(three), str(tmp_path / "out"), 1)
    assert not (tmp_path / "out").exists()


def test_params_that_do_not_match_the_tensors(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir / "gqa-mp1", tmp_path / "bad")
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ValueError, match="layers.0.attention.wk.weight in .*consolidated.00.pth has full shape "
                                         "\\(16, 64\\), but .*params.json .* implies \\(32, 64\\)"):
        convert.to_hf(str(bad), str(tmp_path / "out"))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncate"])
def test_unreadable_files(tiny_dir, tokenizer_path, hf_export, tmp_path, content):
    meta = copy_of(tiny_dir / "mha-mp2", tmp_path / "meta")
    data = (meta / "consolidated.01.pth").read_bytes()
    (meta / "consolidated.01.pth").write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    with pytest.raises(ValueError, match="consolidated.01.pth is not a readable PyTorch checkpoint"):
        Llama.build(str(meta), tokenizer_path, 64, 4, device="cpu", dtype="fp32")

    hf = copy_of(hf_export / "mha", tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        Llama.build(str(hf), None, 64, 4, device="cpu", dtype="fp32")


def test_model_parallel_size_the_heads_do_not_allow(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot be split over 3 processes; sizes that work: \\[1, 2, 4\\]"):
        convert.reshard(str(tiny_dir / "mha-mp1"), str(tmp_path / "out"), 3)
    with pytest.raises(ValueError, match="cannot be split over 16 processes; sizes that work: \\[1, 2, 4, 8\\]"):
        convert.from_hf(str(tiny_dir / "gqa-mp1"), str(tmp_path / "out"), 16)


def test_bad_hf_directories(hf_export, tmp_path):
    config = json.loads((hf_export / "mha" / "config.json").read_text())
    not_llama = copy_of(hf_export / "mha", tmp_path / "mistral")
    (not_llama / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                       "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="config.json describes model_type='mistral'.* only Llama"):
        Llama.build(str(not_llama))

    scaled = copy_of(hf_export / "mha", tmp_path / "scaled")
    (scaled / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3"}}))
    with pytest.raises(ValueError, match="config.json asks for rope scaling"):
        convert.from_hf(str(scaled), str(tmp_path / "out"))

    index = copy_of(hf_export / "mha", tmp_path / "index")
    weight_map = {"lm_head.weight": "gone.safetensors"}
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="index.json lists weight files that are missing: \\['gone"):
        convert.from_hf(str(index), str(tmp_path / "out"))

    no_tokenizer = copy_of(hf_export / "mha", tmp_path / "no-tok")
    os.remove(no_tokenizer / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in .*no-tok: pass tokenizer_path"):
        Llama.build(str(no_tokenizer))

    with pytest.raises(FileNotFoundError, match="no params.json \\(Meta format\\) or config.json"):
        convert.to_hf(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="already exists"):
        convert.to_hf(str(hf_export / "mha"), str(hf_export / "gqa"))


def test_interrupted_conversions_leave_nothing(tiny_dir, monkeypatch, tmp_path):
    import safetensors.torch

    def fail_on_second(original):
        calls = []

        def write(obj, path, *args, **kwargs):
            assert not (tmp_path / "out").exists()  # all writes go to a hidden temporary folder
            calls.append(path)
            if len(calls) == 2:
                raise OSError("disk full")
            return original(obj, path, *args, **kwargs)

        return write

    monkeypatch.setattr(torch, "save", fail_on_second(torch.save))
    with pytest.raises(OSError, match="disk full"):
        convert.reshard(str(tiny_dir / "mha-mp1"), str(tmp_path / "out"), 2)
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second(safetensors.torch.save_file))
    with pytest.raises(OSError, match="disk full"):
        convert.to_hf(str(tiny_dir / "mha-mp1"), str(tmp_path / "out"), max_shard_bytes=100_000)
    assert os.listdir(tmp_path) == []


def test_the_converter_loads_neither_the_model_stack_nor_the_kernels():
    """Reading and writing files needs only the formats: no fairscale, no model, no C++ kernels to build."""
    script = ("import sys, llama.convert, llama.tiny\n"
              "print([m for m in ('fairscale', 'llama.model', 'llama.kernels.cpu') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_shard_is_named(tiny_dir, tokenizer_path, tmp_path):
    """A shard that checklist.chk lists but the folder lacks is named, not blamed on params.json."""
    broken = tmp_path / "gqa"
    shutil.copytree(tiny_dir / "gqa-mp2", broken)
    (broken / "consolidated.01.pth").unlink()
    message = "is missing consolidated.01.pth, which its checklist.chk lists"
    with pytest.raises(FileNotFoundError, match=message):
        convert.reshard(str(broken), str(tmp_path / "out"), model_parallel_size=1)
    with pytest.raises(FileNotFoundError, match=message):
        Llama.build(str(broken), tokenizer_path, 64, 1, device="cpu", dtype="fp32")
    assert not (tmp_path / "out").exists()


WRITE_THEN = """
import os, signal, sys, time
from llama.formats.base import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    open(os.path.join(tmp, "consolidated.00.pth"), "wb").write(b"half a shard")
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    time.sleep(30)
"""


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 128 + 15), ("SIGHUP", 128 + 1), ("SIGINT", -2)])
def test_a_write_ended_by_a_signal_leaves_nothing(tmp_path, signal_name, code):
    proc = subprocess.run([sys.executable, "-c", WRITE_THEN, str(tmp_path / "out"), signal_name], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert os.listdir(tmp_path) == []


def test_the_next_run_removes_what_a_killed_run_left(tiny_dir, tmp_path):
    killed = subprocess.run([sys.executable, "-c", WRITE_THEN, str(tmp_path / "out"), "SIGKILL"], timeout=60)
    assert killed.returncode == -9
    [leftover] = os.listdir(tmp_path)
    assert leftover.startswith(".out.partial-")
    proc = subprocess.run([sys.executable, "-m", "llama.convert", "reshard", str(tiny_dir / "mha-mp1"),
                           str(tmp_path / "out"), "--model_parallel_size", "1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"removed {tmp_path / leftover}, left by an interrupted write of {tmp_path / 'out'}" in proc.stderr
    assert os.listdir(tmp_path) == ["out"]


def test_a_write_in_progress_is_not_touched(tiny_dir, tmp_path):
    """A partial folder of a live process (this one) is another run writing the same destination."""
    busy = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-abc123"
    busy.mkdir()
    with pytest.raises(FileExistsError, match=f"process {os.getpid()} is writing"):
        convert.reshard(str(tiny_dir / "mha-mp1"), str(tmp_path / "out"), 1)
    assert busy.exists()


def test_a_full_disk_is_reported_plainly(tiny_dir, tmp_path, monkeypatch):
    from llama.formats import base

    source_bytes = open_checkpoint(str(tiny_dir / "mha-mp1")).nbytes()
    free = {"bytes": source_bytes // 2}
    monkeypatch.setattr(base.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    with pytest.raises(OSError, match="No space left on device: writing .*out needs about .* GB, and .* GB free"):
        convert.reshard(str(tiny_dir / "mha-mp1"), str(tmp_path / "out"), 2)
    assert os.listdir(tmp_path) == []

    # Enough space announced, but the disk fills while writing: torch.save's own error is explained.
    free["bytes"] = 10**12

    def fill_disk(*args, **kwargs):
        free["bytes"] = 0
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4544 vs 4436")

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(OSError, match="No space left on device while writing .*out \\(.*unexpected pos"):
        convert.reshard(str(tiny_dir / "mha-mp1"), str(tmp_path / "out"), 2)
    assert os.listdir(tmp_path) == []
