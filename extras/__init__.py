"""
tinyseek/extras -- the programs beyond the reading path, each run from the repository root as a module:

    python -m extras.bench     measure DeepSeek-V3's efficiency ideas side by side (results in docs/bench/)
    python -m extras.r1        the DeepSeek-R1 recipe after R1-Zero: cold start, rejection sampling, distillation
    python -m extras.cost      what training costs: FLOPs -> GPU-hours -> dollars, and V3's "$5.576M" checked
    python -m extras.hf        convert checkpoints to and from Hugging Face's DeepseekV3 format

They import the core files (model.py, train.py, grpo.py, sample.py ...); the core files never import them.
"""
