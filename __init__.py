"""ComfyUI Personalize: Textual Inversion and DreamBooth training inside the ComfyUI graph."""

from .nodes.apply_embedding_node import ApplyEmbedding
from .nodes.dreambooth_node import DreamBoothFinetune
from .nodes.graph_types import APPLY_EMBEDDING, DREAMBOOTH_FINETUNE, IMAGE_FOLDER, TRAIN_TEXTUAL_INVERSION
from .nodes.image_folder_node import ImageFolder
from .nodes.textual_inversion_node import TrainTextualInversion

NODE_CLASS_MAPPINGS = {
    TRAIN_TEXTUAL_INVERSION: TrainTextualInversion,
    DREAMBOOTH_FINETUNE: DreamBoothFinetune,
    APPLY_EMBEDDING: ApplyEmbedding,
    IMAGE_FOLDER: ImageFolder,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    TRAIN_TEXTUAL_INVERSION: "Train Textual Inversion",
    DREAMBOOTH_FINETUNE: "DreamBooth Fine-tune",
    APPLY_EMBEDDING: "Apply Embedding",
    IMAGE_FOLDER: "Image Folder (training)",
}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
