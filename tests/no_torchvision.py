"""
Video processors without torchvision, for the tests' tiny families (images only).

transformers 5.24 builds the processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA-OneVision and SmolVLM
with a video processor, and every video processor needs torchvision: without it the processor's class check fails
(`transformers.VideoProcessorMixin` is not exported) and AutoVideoProcessor.from_pretrained finds no class. We
cannot install a torchvision built for the pinned CPU torch, so `allow_processors_without_torchvision` (idempotent,
a no-op where torchvision is there; importing this module calls it) exports VideoProcessorMixin and makes
AutoVideoProcessor fall back to `ImagesOnlyVideoProcessor`, a stand-in that keeps the saved video settings and
their type name (so a machine with torchvision loads the real video processor from the same folder) and refuses
videos. A real user installs the torchvision built for their torch (`pip install torchvision`) and needs none of it.
"""
ImagesOnlyVideoProcessor = None  # the stand-in class, once allow_processors_without_torchvision has made it


def allow_processors_without_torchvision():
    global ImagesOnlyVideoProcessor
    from transformers.utils import is_torchvision_available
    if is_torchvision_available() or ImagesOnlyVideoProcessor is not None:
        return
    import importlib
    # importlib, not `from transformers... import`: transformers re-imports itself once (processing_utils'
    # direct_transformers_import), and only the modules in sys.modules are the ones its loaders use.
    processing_utils = importlib.import_module("transformers.processing_utils")
    video_processing_auto = importlib.import_module("transformers.models.auto.video_processing_auto")
    VideoProcessorMixin = importlib.import_module("transformers.video_processing_utils").VideoProcessorMixin
    # ProcessorMixin's class check looks the base class up by name in its own import of transformers.
    processing_utils.transformers_module.VideoProcessorMixin = VideoProcessorMixin

    class _ImagesOnlyVideoProcessor(VideoProcessorMixin):
        """A video processor's settings without its code (which needs torchvision): no videos."""

        def __init__(self, video_processor_type, **settings):
            self.type_name, self._settings = video_processor_type, settings
            for key, value in settings.items():
                setattr(self, key, value)

        def __call__(self, *args, **kwargs):
            raise NotImplementedError(f"videos need torchvision (ImagesOnlyVideoProcessor stands in for "
                                      f"{self.type_name})")

        def to_dict(self):
            return {**self._settings, "video_processor_type": self.type_name}

        def __repr__(self):
            return f"ImagesOnlyVideoProcessor({self.type_name}, {self._settings})"

    ImagesOnlyVideoProcessor = _ImagesOnlyVideoProcessor

    class AutoVideoProcessor:
        """What transformers' AutoVideoProcessor (unusable without torchvision) becomes: it reads the saved
        video settings and gives the stand-in."""

        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            keep = {k: v for k, v in kwargs.items() if k in ("local_files_only", "subfolder", "revision",
                                                               "cache_dir", "token")}
            config, _ = VideoProcessorMixin.get_video_processor_dict(path, **keep)
            settings = {k: v for k, v in config.items() if not k.startswith("_") and k != "video_processor_type"}
            return ImagesOnlyVideoProcessor(config.get("video_processor_type", "VideoProcessor"), **settings)

    # ProcessorMixin looks AutoVideoProcessor up in this module at each load.
    video_processing_auto.AutoVideoProcessor = AutoVideoProcessor


def video_processor(type_name, **settings):
    """The family's video processor where torchvision is there, the images-only stand-in otherwise."""
    import transformers
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        return getattr(transformers, type_name)(**settings)
    return ImagesOnlyVideoProcessor(type_name, **settings)


allow_processors_without_torchvision()
