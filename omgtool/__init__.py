"""omgtool: checkpoint forensics and conversion for OMG-LLaVA and other LLaVA-family checkpoints.

The library is usable without the CLI::

    from omgtool.formats import open_checkpoint
    ckpt = open_checkpoint("omg_llava_7b_finetune_8gpus.pth")   # no pickle code runs
    for info in ckpt.tensors.values():
        print(info.name, info.shape, info.dtype)
    t = ckpt.read("projector.model.query_proj.weight")          # lazy, mmap-backed
"""

__version__ = "0.1.0"
