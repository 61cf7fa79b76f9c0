"""Training for MeSH models: data preparation, the depth-elastic training loop, evaluation.

    python -m training.prepare  --input FILE --out DIR --vocab-size 4096      # BPE + token memmaps
    python -m training.train    --config training/configs/tiny.toml --data DIR --out RUN
    python -m training.evaluate --model RUN --data DIR --loops 1,2,3,4
    python -m training.default_model --text FILE --out model/default          # the shipped model

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m training.train ...`` (DDP, or FSDP with
``--set train.parallel=fsdp``). Every script is importable and takes ``main(argv)``.
"""
