"""Deploy a local checkpoint folder to a running NDIF stack: `python ndif_deploy.py PATH TASK OUT.json`.

Run by `ndif_stack.NdifStack` as its own process, in the server environment
(`NDIF_RAY_ADDRESS` etc.), so that the test process never joins the Ray cluster.
ndif 0.1.2's auto-deploy cannot size a model under nnsight 0.8.1 (its evaluator
passes `trust_remote_code=` to `describe_checkpoint`, which raises), so the
model is pre-deployed, pinned, with its size given.
"""

import json
import sys
from pathlib import Path

from ndif.cli.lib.deploy import deploy
from nnsight.modeling import huggingface
from nnsight.modeling.transformers import TransformersModel
from transformers import AutoTokenizer


def main(path: str, task: str, out: str) -> None:
    huggingface._ID_CACHE[path] = path  # a folder, not a Hub id: do not ask the Hub to canonicalize it
    model = TransformersModel(path, task=task, tokenizer=AutoTokenizer.from_pretrained(path))
    key = model.to_model_key()
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    result = deploy([dict(checkpoint=path, model_key=key, pinned=True, size_bytes=size, dtype="float32")],
                    on_message=lambda line: print(line, flush=True))
    statuses = [d["status"] for d in result["deployments"]]
    if statuses != ["READY"]:
        sys.exit(f"deployment not ready: {result}")
    Path(out).write_text(json.dumps({"model_key": key}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
