"""The MAE model presets as plain data (no torch), read by dbp.model to build them and by
dbp.config to check a study against them before any job starts."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "mae_vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12,
                                  num_heads=6, decoder_embed_dim=256, decoder_depth=4,
                                  decoder_num_heads=8),
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                 num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                                 decoder_num_heads=16),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24,
                                  num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                                  decoder_num_heads=16),
    # CPU scale: the default study's model (trains in minutes on 2 cores) and the one
    # benchmarks/dbp_step_cost.py times.
    "mae_vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4,
                                   num_heads=2, decoder_embed_dim=96, decoder_depth=1,
                                   decoder_num_heads=3),
    "mae_vit_bench_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6,
                                    num_heads=3, decoder_embed_dim=128, decoder_depth=2,
                                    decoder_num_heads=4),
}
