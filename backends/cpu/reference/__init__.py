"""The float32 reference of every catalogue op: the judge.

Each function upcasts to float32 at entry, computes the op as literally as its definition in
``hal/ops.py`` reads (explicit loops where clearer), and casts back to the input dtype at the
end. No fused tricks, no imports from other backends.
"""
