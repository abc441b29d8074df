"""Device-class recipes and self-contained provisioning images built from them."""

from fleet_server.images.build import ImageBuildError, ImageInfo, build_image
from fleet_server.images.recipe import DeviceClass, RecipeError, list_classes, load_class

__all__ = [
    "DeviceClass",
    "ImageBuildError",
    "ImageInfo",
    "RecipeError",
    "build_image",
    "list_classes",
    "load_class",
]
