"""Datasets (COCO, VOC, synthetic shapes), DETR transforms and batching."""

from oddetr.data.coco import CocoDetection, DetectionDataset
from oddetr.data.collate import collate_detection
from oddetr.data.images import load_image
from oddetr.data.synthetic import SHAPE_CLASSES, generate_synthetic_coco
from oddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from oddetr.data.voc import VOC_CLASSES, VocDetection

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "CocoDetection",
    "DetectionDataset",
    "VocDetection",
    "build_transforms",
    "collate_detection",
    "generate_synthetic_coco",
    "load_image",
]
