"""llama.cpp, the CPU decoding anchor, through llama-cpp-python: an F32 GGUF of a quantized one, and greedy timing.

The F32 file holds exactly the weights the quantized file decodes to (each tensor dequantized with the `gguf`
package), so llama.cpp F32, llama.cpp on the quantized file and a Hugging Face model loaded from that file all
compute with the same weights. Written once next to the converted model in $LEANFORMER_CACHE.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def f32_gguf(source: Path, target: Path) -> Path:
    """``target``: ``source`` with every tensor dequantized to float32, metadata copied (file type set to F32)."""
    if target.is_file():
        return target
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target


def load(path: Path, threads: int, context: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 verbose=False)


def greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """(the new tokens, seconds) of greedy decoding, prompt evaluation included, end-of-sequence ignored."""
    out: list[int] = []
    start = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out, time.perf_counter() - start
