"""nn.Modules built on :func:`ds_attention.attention`; inputs are (batch, seqlen, dim)."""
