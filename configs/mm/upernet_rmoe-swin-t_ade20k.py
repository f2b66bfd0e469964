# An ordinary mmseg model config: UperNet on an RMoE Swin-T (8 residual experts in every other MLP),
# initialised from an rmoe checkpoint (a dense Swin-T is upcycled: experts = core + noise).
# Usable with mmseg's own tools once its dataset/schedule parts are added; the platform's stages build
# the same model from a pipeline config (configs/paper/ade20k_upernet_swin_t.yaml).
custom_imports = dict(imports=["rmoe_platform.mm"], allow_failed_imports=False)

norm_cfg = dict(type="SyncBN", requires_grad=True)
model = dict(
    type="RMoEEncoderDecoder",  # mmseg's EncoderDecoder + the MoE load-balance loss
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=(512, 512),
    ),
    backbone=dict(
        type="RMoESwinTransformer",
        arch="rmoe_swin_tiny_patch4_window7_224",
        model_kwargs=dict(img_size=512, drop_path_rate=0.3),
        moe=dict(num_experts=8, top_k=1, residual=True, init_noise=0.01),
        moe_layers="every_other",
        checkpoint=None,  # e.g. "runs/checkpoints/<exp>/<run>/checkpoint_…/model.safetensors"
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[96, 192, 384, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
