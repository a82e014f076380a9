"""A GGUF tokenizer without torch (``services/gguf_tokenizer.py``) is transformers' own conversion.

The oracle is ``AutoTokenizer.from_pretrained(gguf_file=)``, which the suite's tokenizer registry
has cached for both bundled models: the same tokenizer class and, in a process where torch cannot
be imported, the same ``tokenizer.json`` byte for byte and the same encodings (SmolLM2: reading
Gemma-3's 262k-token vocabulary costs half a minute; the deploy smoke run converts it in the
tokenizer image, which has no torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from coolfusion.services.gguf_tokenizer import tokenizer_class
from coolfusion.services.sources import converted_dir, parse_spec

BLOCK_TORCH = "import sys\nfor m in ('torch', 'accelerate'):\n    sys.modules[m] = None  # as if not installed\n"
TEXTS = ["Hello world", "  two  spaces\n\nand lines", "日本語のテキスト 🙂", "x = [1, 2]  # code"]


@pytest.mark.parametrize("model, architecture", [("smollm2", "llama"), ("gemma3", "gemma3")])
def test_the_class_is_the_one_autotokenizer_picks(tokenizer_registry, model, architecture):
    assert tokenizer_class(architecture, {}, ()) is type(tokenizer_registry.get(model).hf)


@pytest.mark.slow
def test_a_process_without_torch_converts_the_same_tokenizer(tokenizer_registry, tmp_path):
    spec = parse_spec("smollm2")
    script = BLOCK_TORCH + (
        "import json\n"
        "from coolfusion.services.sources import load_hf_tokenizer, parse_spec\n"
        "tok = load_hf_tokenizer(parse_spec('smollm2'))\n"
        f"print(json.dumps([tok.encode(t) for t in {TEXTS!r}]))\n"
        "assert sys.modules['torch'] is None\n"
    )
    env = {**os.environ, "COOLFUSION_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tokenizer_registry.get("smollm2").hf
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [reference.encode(t) for t in TEXTS]
    theirs = converted_dir(spec, "tokenizer")
    ours = tmp_path / theirs.parent.name / theirs.name
    assert (ours / "tokenizer.json").read_bytes() == (theirs / "tokenizer.json").read_bytes()
