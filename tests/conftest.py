"""Shared test set-up: the project's modules live at the repository's top level."""
import os
import sys
from pathlib import Path

# One thread for torch here and in the command lines the tests start (they inherit it): the tiny
# models' operations are too small to share out, and on a machine whose cores are busy with another
# job, threads that wait for each other made a tiny UNet call 100 times slower (2 s against 0.02).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402 (after the thread count is set)
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))  # bench.py and its notebook pipeline


@pytest.fixture(scope="session", autouse=True)
def _speed_choices_of_the_session(tmp_path_factory):
    """speed.py's measured choices go to a file of this session (the command lines started inherit it),
    not to the user's cache."""
    import speed
    os.environ[speed.CHOICES_VARIABLE] = str(tmp_path_factory.mktemp("cache") / "speed-choices.json")
    speed.remembered.cache_clear()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_estimate_line(monkeypatch):
    """In-process runs say nothing of how long an image takes: on a busy machine the estimate before the
    first image could pass runner.LONG_RUN_S and add a line to the stderr a test reads. The tests of that
    line set LONG_RUN_S themselves."""
    import runner
    monkeypatch.setattr(runner, "LONG_RUN_S", float("inf"))


def _openai_bytes_to_unicode() -> list[str]:
    """OpenAI CLIP's byte -> unicode table, as the list of its 256 values in vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = [b for b in range(256) if b not in bs]
    return [chr(c) for c in cs] + [chr(256 + n) for n in range(len(extra))]


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory):
    """Folder with the real CLIP `vocab.json` + `merges.txt` (as on the hub's SD v1.5 `tokenizer/`).

    Built from `bpe_simple_vocab_16e6.txt.gz` shipped in the `open_clip_torch` wheel, the way OpenAI's
    SimpleTokenizer builds its encoder. The package is located without importing it (its import needs
    torchvision).
    """
    import gzip
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch is not installed: pip install --no-deps open_clip_torch==3.3.0")
    gz = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = _openai_bytes_to_unicode()
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = tmp_path_factory.mktemp("clip_vocab")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_reference():
    """The reference implementations' tiny random-weight (unet, vae, text_encoder)."""
    from tiny_models import tiny_reference_models
    return tiny_reference_models()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory, clip_vocab_dir, tiny_reference):
    """A diffusers-layout folder (saved by diffusers/transformers) holding the tiny models."""
    from tiny_models import save_diffusers_folder
    return save_diffusers_folder(tmp_path_factory.mktemp("tiny_sd"), clip_vocab_dir, tiny_reference)


@pytest.fixture(scope="session")
def sd(tiny_sd_dir):
    """Our models, loaded from the tiny folder by the project's own loader (read-only in tests)."""
    from weights import load_stable_diffusion
    return load_stable_diffusion(tiny_sd_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, clip_vocab_dir):
    """A folder in the hub's openai/clip-vit-base-patch16 layout (saved by transformers) holding a tiny CLIP."""
    from tiny_models import TINY_CLIP_MODEL, clip_reference, save_clip_folder
    return save_clip_folder(tmp_path_factory.mktemp("tiny_clip"), clip_vocab_dir, clip_reference(TINY_CLIP_MODEL, 5))
