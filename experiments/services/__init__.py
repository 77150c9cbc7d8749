"""HTTP services with the reference's (MetaStone-S1 / XBai-o4) endpoints: the policy's
`POST /generate` and the SPRM scorer's `POST /score`; started by `python -m experiments.serve`.

Usage:
    python -m experiments.serve policy --model outputs/checkpoints/tiny-arith/final --port 8000
    python -m experiments.serve scorer --model runs/tiny-sprm --port 8001
"""
