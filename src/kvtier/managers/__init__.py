"""The leader's tier managers: what each tier holds and how its transfers end.

``HostManager`` (G2), ``DiskManager`` (G3) and ``RemoteManager`` (G4) each own one tier's
bookkeeping; ``Loads`` plans and commits onboarding across them, ``OffloadPipeline`` offloads
down them (G1 -> G2 -> G3/G4, sharing a G2 pin as a lease), and ``Operations`` collects every
rank's per-operation results. Engine-neutral and free of torch and I/O.
"""
