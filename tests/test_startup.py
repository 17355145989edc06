"""A command line that starts fast (issue 16): ``moecore --help``, ``moecore CMD --help``, a
mistyped flag and ``import moecore`` import no torch, transformers or any other third-party
package; the quantizer still registers, lazily, so ``from_pretrained`` loads a compressed
checkpoint bit-identically after ``import moecore`` (whichever of the two loads first).

Asserted on the modules a fresh interpreter has imported, not on time:
``benchmarks/startup.py`` measures the time."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moecore
from moecore.config import CompressionConfig

from ._tiny_models import subprocess_env, tiny_mixtral

COMMANDS = ["compress", "stats", "plan", "export", "eval", "distill", "recover"]

# prints the top-level packages the CLI imported, apart from the standard library and moecore
CLI_PROBE = """
import json, sys
before = set(sys.modules)
from moecore.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
new = {m.split(".")[0] for m in set(sys.modules) - before}
print(json.dumps(sorted(new - set(sys.stdlib_module_names) - {"moecore"})))
"""


def _probe(code: str, *args: str):
    """Run ``code`` in a fresh interpreter; its last line of output, as JSON."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=subprocess_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["compress", "--help"], ["compress", "--bogus"],
                                  ["compres", "M"], ["plan", "c.json", "--rank", "two"],
                                  *([c, "--help"] for c in COMMANDS[1:])], ids=" ".join)
def test_help_and_parse_errors_import_no_third_party_package(argv):
    assert _probe(CLI_PROBE, *argv) == []


def test_import_moecore_imports_no_torch():
    code = ("import json, sys\nbefore = set(sys.modules)\nimport moecore\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before}"
            " - set(sys.stdlib_module_names) - {'moecore'})))")
    assert _probe(code) == []


def test_the_public_api_resolves_lazily():
    for name in moecore.__all__:
        assert getattr(moecore, name) is not None, name
    assert set(moecore.__all__) <= set(dir(moecore))
    assert moecore.CompressionConfig is CompressionConfig
    assert moecore.checkpoint_format.QUANT_METHOD == "moecore"  # a submodule, imported on access
    with pytest.raises(AttributeError):
        moecore.no_such_name  # noqa: B018


# loads DIR with from_pretrained in a fresh interpreter; ORDER says whether transformers' quantizers
# are loaded before (the quantizer registers at `import moecore`) or after (the hook registers it)
LOAD_PROBE = """
import json, sys
d, ref, order = sys.argv[1:]
if order == "transformers-first":
    import transformers.modeling_utils
import moecore
torch_at_import = "torch" in sys.modules
from transformers import AutoModelForCausalLM
import torch
from moecore.hf_hook import QuantizerHook
model = AutoModelForCausalLM.from_pretrained(d).eval()
ids = torch.arange(2, 18).reshape(2, 8)
with torch.no_grad():
    same = torch.equal(model(ids).logits, torch.load(ref))
print(json.dumps({"torch_at_import": torch_at_import, "same": same,
                  "compressed": type(model.model.layers[0].mlp.experts).__name__,
                  "hooks": [type(f).__name__ for f in sys.meta_path if isinstance(f, QuantizerHook)]}))
"""


@pytest.mark.parametrize("order", ["moecore-first", "transformers-first"])
def test_from_pretrained_after_import_moecore_is_bit_identical(tmp_path, order):
    model, tok = tiny_mixtral(seed=0, hidden=32)
    moecore.compress(model, moecore.CompressionConfig(rank=2, refine_steps=0), progress=False)
    out = moecore.save_compressed(model, tmp_path / "c", tokenizer=tok)
    with torch.no_grad():
        torch.save(model(torch.arange(2, 18).reshape(2, 8)).logits, tmp_path / "ref.pt")
    res = _probe(LOAD_PROBE, str(out), str(tmp_path / "ref.pt"), order)
    assert res == {"torch_at_import": order == "transformers-first", "same": True,
                   "compressed": "CompressedExperts", "hooks": []}
