"""Names this pack shows in the graph. They are stored in users' saved workflows: never rename."""

CATEGORY = "personalize"

# Custom socket types.
EMBEDDING = "EMBEDDING"
TRAINING_IMAGES = "PERSONALIZE_TRAINING_IMAGES"

# Node type keys, unique to this pack.
APPLY_EMBEDDING = "PersonalizeApplyEmbedding"
TRAIN_TEXTUAL_INVERSION = "PersonalizeTrainTextualInversion"
DREAMBOOTH_FINETUNE = "PersonalizeDreamBoothFinetune"
IMAGE_FOLDER = "PersonalizeImageFolder"
