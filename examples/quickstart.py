"""What `make demo` runs: capture a GPT, print its annotated layer table, and show that the
captured graph trains exactly like the model it came from.

Later issues extend this to the full compile -> plan -> train on local ranks.

    python examples/quickstart.py
"""

from __future__ import annotations

import warnings

import torch

import galvatron_fx as gfx
from galvatron_fx.models.spec import parse_model_spec

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=4096,seq=256"
BATCH, SEQ, STEPS = 4, 128, 3


def main() -> None:
    torch.manual_seed(0)
    spec = parse_model_spec(SPEC)
    model = spec.build("cpu")
    args, kwargs = spec.example_inputs(model, BATCH, SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gfx.analyze(model, args, kwargs)
    print(f"{SPEC}  batch={BATCH} seq={SEQ}")
    print(gfx.summary(result.graph_module))
    print("passes:", ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items()))

    # The captured graph owns the model's parameters under their original names: train it
    # and an identical copy of the eager model side by side.
    gm = result.graph_module
    reference = spec.build("cpu")
    reference.load_state_dict(model.state_dict())
    opt_gm = torch.optim.SGD(gm.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    print("\nstep  loss (captured graph)  loss (eager model)")
    for step in range(STEPS):
        losses = []
        for net, opt in ((gm, opt_gm), (reference, opt_ref)):
            opt.zero_grad()
            loss = net(*args, **kwargs)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"{step:4d}  {losses[0]:21.6f}  {losses[1]:18.6f}")
    ref_params = dict(reference.named_parameters())
    worst = max((p - ref_params[name]).abs().max().item() for name, p in gm.named_parameters())
    print(f"largest parameter difference after {STEPS} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
