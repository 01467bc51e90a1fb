"""Runtime: what a lowered program needs to train on ranks. The program's types (`program`),
process groups and collectives as graph ops (`collectives`, `mesh`), gradient sync and
ZeRO (`data_parallel`), the trainable models (`compiled`, `pipeline`, `assemble`), whole
state and checkpoints, launching, and the measuring tools (profiler, layer timer, memory
probe). It imports no pass and no search: it runs a plan, it never makes one."""
