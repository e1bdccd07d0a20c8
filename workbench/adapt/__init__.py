"""Building blocks of source-free adaptation that every family uses (images, dense maps, agents).

    information.py  entropy, information maximisation (SHOT's L_ent + diversity), rotations for SHOT++
    cluster.py      SHOT's cosine k-means pseudo-labels (faiss on the CPU or GPU, or torch)
    training.py     SHOT's optimiser and schedule, loaders sharded over torchrun ranks, prediction,
                    batch-norm synchronisation, accuracy and confusion matrices
"""
