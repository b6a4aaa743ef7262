"""Give torchtitan titanlite's training data, so that the side-by-side runs see the same tokens.

Writes, under .tt/tests/assets/ (bench/gpu_case.sh runs torchtitan in .tt/, and calls this first when
the tokenizer folder is missing):
  c4_test/data.json        titanlite's default corpus (titanlite/data/corpus.py, the same 20,000 documents
                           titanlite trains on by default), one {"text": ...} per line, for torchtitan's
                           `c4_test` loader;
  tokenizer_titanlite/     titanlite's default tokenizer as a Hugging Face tokenizer.json.
At the 700 W power cap the H200's clock depends on what the tensors hold, so the two frameworks
are compared on the same text and the same token ids (the model shapes and LR are set by the caller;
torchtitan's trainer with our shapes is bench/torchtitan_run.py).

    python bench/tt_assets.py [--tt .tt]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.config.settings import Data  # noqa: E402
from titanlite.data.corpus import generate_documents  # noqa: E402
from titanlite.data.hf_tokenizer import write_hf_tokenizer  # noqa: E402
from titanlite.data.tokenizer import build_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tt", type=Path, default=Path(".tt"))
    args = parser.parse_args()
    assets = args.tt / "tests" / "assets"
    (assets / "c4_test").mkdir(parents=True, exist_ok=True)
    documents = generate_documents(Data().default_num_documents)
    with open(assets / "c4_test" / "data.json", "w") as out:
        out.writelines(json.dumps({"text": text}) + "\n" for text in documents)
    write_hf_tokenizer(build_tokenizer("default").byte_pair_encoding(), assets / "tokenizer_titanlite", 131072)
    print(f"wrote {len(documents)} documents and the default tokenizer under {assets}")


if __name__ == "__main__":
    main()
