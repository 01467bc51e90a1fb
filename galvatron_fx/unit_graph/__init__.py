"""Readers of an annotated graph, by unit: which nodes each layer or segment holds and how
activations flow between them (`units`), its attention cores (`attention`), the head counts,
widths and sequences tensor parallelism splits (`shapes`), and the model's fingerprint.

They read the `gfx_layer` / `gfx_cost` keys and `val` only and write nothing; passes, the
lowering, pricing and the display all read a graph through them. They sit below the passes
so that a pass and the pricing of its result share one definition of "a unit's nodes".
"""
