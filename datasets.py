"""The benchmark datasets: where their files lie, their classes, and how label values map to classes.

Each preset reads a dataset in the layout its distribution unpacks to (docs/evaluation.md says how
to get each): a reader lists its (image, label map) pairs, a table maps the label maps' values to
class indices 0..C-1, IGNORE (255) where a pixel counts nowhere; PASCAL-Context-459's label maps are
16-bit, their table 65,536 values long, IGNORE_16 (65535) ignored. evaluate.py scores predictions on
them; `emerdiff.py --dataset` (runner.py) segments their images. DiffSeg's two presets,
coco-stuff-27 and cityscapes, segment and score each image's centred square, as DiffSeg does; the
presets of EmerDiff's Table 2 use whole images. Only the standard library, numpy and Pillow are used.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from files import FileError, checked_file, folder_name, listed_folder, shown

IGNORE = 255  # the value, and class id, of pixels that count nowhere in 8-bit label maps (every dataset's but one)
IGNORE_16 = 65535  # likewise in 16-bit label maps (PASCAL-Context-459's)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class EvaluationError(Exception):
    """Bad input to the evaluation or the dataset readers; the message is one line that says what is
    wrong and what to do."""


@dataclass(frozen=True)
class LabelFormat:
    """How a dataset's label maps hold their values: the Pillow modes read, the value (and class id) of the
    pixels that count nowhere, and what to say of a map of another mode."""
    modes: tuple[str, ...]
    ignore: int
    hint: str


EIGHT_BIT = LabelFormat(("L", "P"), IGNORE, "not 8-bit class ids; save it as a grayscale (L) or palette (P) PNG")
SIXTEEN_BIT = LabelFormat(("I;16",), IGNORE_16, "not a 16-bit label map; make it with ODISE's "
                          "datasets/prepare_pascal_ctx_full_sem_seg.py (docs/evaluation.md)")


@dataclass(frozen=True)
class Sample:
    stem: str  # the prediction folder name: PRED/<stem>/labels.png (unique within a dataset)
    image: Path
    label: Path
    crop: bool  # True for DiffSeg's presets (the centre square), False for whole images


# ---- COCO-Stuff-27 (DiffSeg's) ----
# The stuffthingmaps PNGs hold the 182 COCO-Stuff ids minus one (0 = person ... 181 = wood; 255 unlabelled).
# The 27 coarse classes are their parents in the COCO-Stuff label hierarchy: 12 "things" then 15 "stuff",
# in the order IIC introduced and PiCIE, STEGO and DiffSeg kept (IIC: `_sorted_coarse_names`; STEGO:
# src/data.py `Coco.fine_to_coarse`; PiCIE/DiffSeg load the same table from `fine_to_coarse_dict.pickle`).
COCO_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle",  # things 0-11
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water")  # stuff 12-26
COCO_FINE_TO_COARSE = (  # index: fine id (COCO-Stuff id - 1); value: coarse class
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 80-99: things end at 90
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24)  # 180-181
# (images folder, labels folder) under ROOT, tried in this order:
COCO_LAYOUTS = (("val2017", "stuffthingmaps_trainval2017/val2017"),  # each zip unzipped into a folder of its name
                ("images/val2017", "annotations/val2017"))  # the COCO-Stuff repository's set-up (PiCIE, STEGO)
COCO_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"  # the 2,175 val images IIC curated, one id per line

# ---- Cityscapes (label ids in gtFine_labelIds.png) ----
# "cityscapes": DiffSeg's 27 classes, label ids 7..33 (ids 0..6 are void and ignored).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle")
CITYSCAPES_FIRST_ID = 7
# Each class's colour in Cityscapes' own pictures (cityscapesScripts, helpers/labels.py); the page of a run
# (page.py) draws the ground truth in them. The other datasets define none: a fixed palette there.
CITYSCAPES_COLOURS = {
    "road": (128, 64, 128), "sidewalk": (244, 35, 232), "parking": (250, 170, 160), "rail track": (230, 150, 140),
    "building": (70, 70, 70), "wall": (102, 102, 156), "fence": (190, 153, 153), "guard rail": (180, 165, 180),
    "bridge": (150, 100, 100), "tunnel": (150, 120, 90), "pole": (153, 153, 153), "polegroup": (153, 153, 153),
    "traffic light": (250, 170, 30), "traffic sign": (220, 220, 0), "vegetation": (107, 142, 35),
    "terrain": (152, 251, 152), "sky": (70, 130, 180), "person": (220, 20, 60), "rider": (255, 0, 0),
    "car": (0, 0, 142), "truck": (0, 0, 70), "bus": (0, 60, 100), "caravan": (0, 0, 90), "trailer": (0, 0, 110),
    "train": (0, 80, 100), "motorcycle": (0, 0, 230), "bicycle": (119, 11, 32)}
CITYSCAPES_VALUES = 34  # label ids 0..33 (license plate, -1, is stored as 255)
# "cityscapes-19": the 19 evaluation classes (Cityscapes' trainIds), label id -> name; the rest is ignored.
CITYSCAPES_19 = {7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole", 19: "traffic light",
                 20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
                 27: "truck", 28: "bus", 31: "train", 32: "motorcycle", 33: "bicycle"}

# ---- ADE20K (SceneParsing, ADEChallengeData2016): annotation 0 = "other", ignored; 1..150 -> 0..149 ----
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
# ---- PASCAL-Context-59 (SegmentationClassContext as mmsegmentation prepares it): 0 = background, ignored ----
PASCAL_CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")
# ---- COCO-Stuff-171: the 182 fine ids (as in the stuffthingmaps: COCO-Stuff id - 1), less the 11 COCO
# thing ids that no image uses (None below), in id order ----
COCO_FINE_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", None,  # things: ids 1-91
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood")  # stuff: ids 92-182
# ---- PASCAL-Context-459 (the full annotations, as ODISE prepares them): value = class; 65535 unlabelled ----
# The dataset's labels.txt order (LabelMap values 1..459, less one), with MaskCLIP's readable names
# (chongzhou96/MaskCLIP, tools/maskclip_utils/prompt_engineering.py: all_pascal_context_classes).
PASCAL_CONTEXT_459_CLASSES = (
    "accordion", "airplane", "air conditioner", "antenna", "artillery", "ashtray", "atrium", "baby carriage", "bag",
    "ball", "balloon", "bamboo weaving", "barrel", "baseball bat", "basket", "basketball backboard", "bathtub",
    "bed", "bedclothes", "beer", "bell", "bench", "bicycle", "binoculars", "bird", "bird cage", "bird feeder",
    "bird nest", "blackboard", "board", "boat", "bone", "book", "bottle", "bottle opener", "bowl", "box",
    "bracelet", "brick", "bridge", "broom", "brush", "bucket", "building", "bus", "cabinet", "cabinet door", "cage",
    "cake", "calculator", "calendar", "camel", "camera", "camera lens", "can", "candle", "candle holder", "cap",
    "car", "card", "cart", "case", "casette recorder", "cash register", "cat", "cd", "cd player", "ceiling",
    "cell phone", "cello", "chain", "chair", "chessboard", "chicken", "chopstick", "clip", "clippers", "clock",
    "closet", "cloth", "clothes tree", "coffee", "coffee machine", "comb", "computer", "concrete", "cone",
    "container", "control booth", "controller", "cooker", "copying machine", "coral", "cork", "corkscrew",
    "counter", "court", "cow", "crabstick", "crane", "crate", "cross", "crutch", "cup", "curtain", "cushion",
    "cutting board", "dais", "disc", "disc case", "dishwasher", "dock", "dog", "dolphin", "door", "drainer", "dray",
    "drink dispenser", "drinking machine", "drop", "drug", "drum", "drum kit", "duck", "dumbbell", "earphone",
    "earrings", "egg", "electric fan", "electric iron", "electric pot", "electric saw", "electronic keyboard",
    "engine", "envelope", "equipment", "escalator", "exhibition booth", "extinguisher", "eyeglass", "fan", "faucet",
    "fax machine", "fence", "ferris wheel", "fire extinguisher", "fire hydrant", "fire place", "fish", "fish tank",
    "fishbowl", "fishing net", "fishing pole", "flag", "flagstaff", "flame", "flashlight", "floor", "flower", "fly",
    "foam", "food", "footbridge", "forceps", "fork", "forklift", "fountain", "fox", "frame", "fridge", "frog",
    "fruit", "funnel", "furnace", "game controller", "game machine", "gas cylinder", "gas hood", "gas stove",
    "gift box", "glass", "glass marble", "globe", "glove", "goal", "grandstand", "grass", "gravestone", "ground",
    "guardrail", "guitar", "gun", "hammer", "hand cart", "handle", "handrail", "hanger", "hard disk drive", "hat",
    "hay", "headphone", "heater", "helicopter", "helmet", "holder", "hook", "horse", "horse-drawn carriage",
    "hot-air balloon", "hydrovalve", "ice", "inflator pump", "ipod", "iron", "ironing board", "jar", "kart",
    "kettle", "key", "keyboard", "kitchen range", "kite", "knife", "knife block", "ladder", "ladder truck", "ladle",
    "laptop", "leaves", "lid", "life buoy", "light", "light bulb", "lighter", "line", "lion", "lobster", "lock",
    "machine", "mailbox", "mannequin", "map", "mask", "mat", "match book", "mattress", "menu", "metal", "meter box",
    "microphone", "microwave", "mirror", "missile", "model", "money", "monkey", "mop", "motorbike", "mountain",
    "mouse", "mouse pad", "musical instrument", "napkin", "net", "newspaper", "oar", "ornament", "outlet", "oven",
    "oxygen bottle", "pack", "pan", "paper", "paper box", "paper cutter", "parachute", "parasol", "parterre",
    "patio", "pelage", "pen", "pen container", "pencil", "person", "photo", "piano", "picture", "pig", "pillar",
    "pillow", "pipe", "pitcher", "plant", "plastic", "plate", "platform", "player", "playground", "pliers", "plume",
    "poker", "poker chip", "pole", "pool table", "postcard", "poster", "pot", "potted plant", "printer",
    "projector", "pumpkin", "rabbit", "racket", "radiator", "radio", "rail", "rake", "ramp", "range hood",
    "receiver", "recorder", "recreational machines", "remote control", "road", "robot", "rock", "rocket",
    "rocking horse", "rope", "rug", "ruler", "runway", "saddle", "sand", "saw", "scale", "scanner", "scissors",
    "scoop", "screen", "screwdriver", "sculpture", "scythe", "sewer", "sewing machine", "shed", "sheep", "shell",
    "shelves", "shoe", "shopping cart", "shovel", "sidecar", "sidewalk", "sign", "signal light", "sink",
    "skateboard", "ski", "sky", "sled", "slippers", "smoke", "snail", "snake", "snow", "snowmobiles", "sofa",
    "spanner", "spatula", "speaker", "speed bump", "spice container", "spoon", "sprayer", "squirrel", "stage",
    "stair", "stapler", "stick", "sticky note", "stone", "stool", "stove", "straw", "stretcher", "sun", "sunglass",
    "sunshade", "surveillance camera", "swan", "sweeper", "swim ring", "swimming pool", "swing", "switch", "table",
    "tableware", "tank", "tap", "tape", "tarp", "telephone", "telephone booth", "tent", "tire", "toaster", "toilet",
    "tong", "tool", "toothbrush", "towel", "toy", "toy car", "track", "train", "trampoline", "trash bin", "tray",
    "tree", "tricycle", "tripod", "trophy", "truck", "tube", "turtle", "tv monitor", "tweezers", "typewriter",
    "umbrella", "unknown", "vacuum cleaner", "vending machine", "video camera", "video game console",
    "video player", "video tape", "violin", "wakeboard", "wall", "wallet", "wardrobe", "washing machine", "watch",
    "water", "water dispenser", "water pipe", "water skate board", "watermelon", "whale", "wharf", "wheel",
    "wheelchair", "window", "window blinds", "wineglass", "wire", "wood", "wool")


def lookup_table(mapping: dict[int, int], ignore: int = IGNORE) -> np.ndarray:
    """(ignore + 1,) label value -> class, `ignore` where unmapped: uint8 for 8-bit label maps (IGNORE),
    uint16 for 16-bit ones (IGNORE_16)."""
    table = np.full(ignore + 1, ignore, dtype=np.min_scalar_type(ignore))
    for value, cls in mapping.items():
        table[value] = cls
    return table


def shifted(count: int) -> np.ndarray:
    """Label values 1..count are the classes 0..count-1; 0 and the rest are ignored."""
    return lookup_table({value: value - 1 for value in range(1, count + 1)})


COCO_171_CLASSES = tuple(name for name in COCO_FINE_CLASSES if name is not None)
COCO_FINE_TO_171 = {fine: COCO_171_CLASSES.index(name) for fine, name in enumerate(COCO_FINE_CLASSES) if name}


@dataclass(frozen=True)
class Preset:
    classes: tuple[str, ...]
    labels: np.ndarray  # label value -> class index, label_format.ignore where a pixel counts nowhere
    reader: Callable[[Path], list[tuple[Path, Path]]]  # root -> (image, label map) pairs
    crop: bool  # segment and score the centred square (DiffSeg's protocol), else the whole image
    resolution: str  # the scoring resolution by default: "512" (DiffSeg's) or "native"
    values: int  # the dataset defines label values 0..values-1 (a class, or ignored) and the ignored value;
    # others count nowhere
    colours: tuple | None = None  # (R, G, B) per class where the dataset draws its classes in its own colours
    label_format: LabelFormat = EIGHT_BIT

    def undefined(self, ids: np.ndarray) -> dict[int, int]:
        """{label value: pixels of `ids`} of the values this dataset does not define (evaluate.py reports them)."""
        values, counts = np.unique(ids[(ids >= self.values) & (ids != self.label_format.ignore)], return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


# ---- Readers ----

def check_unique(samples: list[Sample]):
    """One rule for every reader: two images whose predictions would share a folder (the same stem,
    stems that files.folder_name makes alike, or names alike but for case, one folder on macOS and
    Windows) are refused, naming both."""
    seen = {}
    for sample in samples:
        name = folder_name(sample.stem)
        if name.casefold() in seen:
            raise EvaluationError(f"{shown(seen[name.casefold()].image)} and {shown(sample.image)} would share "
                                  f"the output folder {shown(name)}: rename one")
        seen[name.casefold()] = sample


def existing_folder(folder: Path, hint: str) -> Path:
    """`folder`, checked to be a folder that can be listed."""
    if not folder.is_dir():
        raise EvaluationError(f"{shown(folder)}: no such folder; {hint} (see docs/evaluation.md)")
    try:
        listed_folder(folder)
    except FileError as e:
        raise EvaluationError(str(e)) from None
    return folder


def paired(images: list[Path], label_of) -> list[tuple[Path, Path]]:
    """(image, label) per image; every image must have its label file."""
    pairs = []
    for image in images:
        label = label_of(image)
        try:
            pairs.append((image, checked_file(label, missing=f"missing, the label of {shown(image)}")))
        except FileError as e:
            raise EvaluationError(str(e)) from None
    return pairs


def coco_pairs(root: Path) -> list[tuple[Path, Path]]:
    """val2017/<id>.jpg with stuffthingmaps val2017/<id>.png (either layout of COCO_LAYOUTS)."""
    layouts = [(root / images, root / labels) for images, labels in COCO_LAYOUTS]
    images, labels = next((layout for layout in layouts if layout[0].is_dir()), layouts[0])
    image_dir = existing_folder(images, f"unzip val2017.zip -d {shown(images.parent)}")
    label_dir = existing_folder(labels, f"unzip stuffthingmaps_trainval2017.zip -d {shown(labels.parent)}")
    return paired(images_in(image_dir, {".jpg"}), lambda image: label_dir / f"{image.stem}.png")


def cityscapes_pairs(root: Path) -> list[tuple[Path, Path]]:
    """leftImg8bit/val/<city>/<name>_leftImg8bit.png with gtFine/val/<city>/<name>_gtFine_labelIds.png."""
    image_dir = existing_folder(root / "leftImg8bit" / "val", f"unzip leftImg8bit_trainvaltest.zip -d {shown(root)}")
    label_dir = existing_folder(root / "gtFine" / "val", f"unzip gtFine_trainvaltest.zip -d {shown(root)}")

    def label_of(image: Path) -> Path:
        name = image.name.removesuffix("_leftImg8bit.png")
        return label_dir / image.parent.name / f"{name}_gtFine_labelIds.png"
    return paired(sorted(image_dir.glob("*/*_leftImg8bit.png")), label_of)


def images_in(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """The entries of `folder` whose suffix is one of `suffixes` in any case (.JPG too), sorted."""
    return [p for p in listed_folder(folder) if p.suffix.lower() in suffixes]


def folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """images/<stem>.<ext> with labels/<stem>.png."""
    image_dir = existing_folder(root / "images", "put the images there")
    label_dir = existing_folder(root / "labels", "put one <stem>.png of class ids per image there")
    return paired([p for p in images_in(image_dir) if p.is_file()], lambda image: label_dir / f"{image.stem}.png")


def text_lines(path: Path, what: str) -> list[str]:
    """The lines of a text file, read through files.checked_file; a problem is one line, `what` first."""
    try:
        return checked_file(path).read_text().splitlines()
    except FileError as e:
        raise EvaluationError(f"{what}{shown(path)}: cannot read it ({e.reason})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{what}{shown(path)}: cannot read it ({e.__class__.__name__})") from None


def once_each(path: Path, what: str) -> list[str]:
    """The entries of a list file, one per line, blank lines skipped; an entry listed twice is refused,
    naming both lines."""
    first = {}
    for number, line in enumerate(text_lines(path, what), 1):
        entry = line.strip()
        if entry in first:
            raise EvaluationError(f"{shown(path)} line {number}: {shown(entry)} is listed twice (line "
                                  f"{first[entry]} too): list each image once")
        if entry:
            first[entry] = number
    return list(first)


def listed(samples: list[Sample], list_file: Path) -> list[Sample]:
    """The samples named in `list_file`: one image per line, as an id ("000000000139") or a file name."""
    lines = text_lines(list_file, "--list ")
    by_stem = {s.stem: s for s in samples}
    chosen = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stem = Path(line.strip()).stem
        if stem not in by_stem:
            raise EvaluationError(f"--list {shown(list_file)} line {number}: {shown(stem)} is not an image "
                                  "of the dataset under --root")
        chosen[stem] = by_stem[stem]
    return list(chosen.values())


def validation_pairs(root: Path, annotations: str, suffix: str, hint: str) -> list[tuple[Path, Path]]:
    """images/validation/<name>.jpg with <annotations>/validation/<name><suffix>: ADE20K's layout, which
    detectron2's preparation scripts keep."""
    image_dir = existing_folder(root / "images" / "validation", hint)
    label_dir = existing_folder(root / annotations / "validation", hint)
    return paired(images_in(image_dir, {".jpg"}), lambda image: label_dir / f"{image.stem}{suffix}")


def ade20k_pairs(root: Path) -> list[tuple[Path, Path]]:
    """ADEChallengeData2016: images/validation/<name>.jpg with annotations/validation/<name>.png."""
    return validation_pairs(root, "annotations", ".png", "unzip ADEChallengeData2016.zip; --root is its folder")


def pascal_context_459_pairs(root: Path) -> list[tuple[Path, Path]]:
    """pascal_ctx_d2 as ODISE's datasets/prepare_pascal_ctx_sem_seg.py (the 5,105 val images) and
    prepare_pascal_ctx_full_sem_seg.py (their 16-bit label maps) leave it: images/validation/<id>.jpg with
    annotations_ctx459/validation/<id>.tif."""
    return validation_pairs(root, "annotations_ctx459", ".tif", "prepare it with ODISE's datasets/prepare_pascal_ctx_"
                            "sem_seg.py, then prepare_pascal_ctx_full_sem_seg.py; --root is pascal_ctx_d2")


def pascal_context_pairs(root: Path) -> list[tuple[Path, Path]]:
    """VOC2010 as mmsegmentation's preparation leaves it: the ids of ImageSets/SegmentationContext/val.txt,
    JPEGImages/<id>.jpg with SegmentationClassContext/<id>.png."""
    hint = "prepare VOC2010 with mmsegmentation's tools/dataset_converters/pascal_context.py"
    image_dir = existing_folder(root / "JPEGImages", hint)
    label_dir = existing_folder(root / "SegmentationClassContext", hint)
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    images = [image_dir / f"{entry}.jpg" for entry in once_each(split, f"{hint}: the list of validation images, ")]
    for image in images:
        if not image.is_file():
            raise EvaluationError(f"{shown(image)}: missing, listed in {shown(split)}")
    return paired(images, lambda image: label_dir / f"{image.stem}.png")


def center_crop(image: Image.Image) -> Image.Image:
    """The centred square of side min(w, h): DiffSeg's crop, the same for an image and its label map."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


# ---- Presets ----

PRESETS = {
    "coco-stuff-27": Preset(COCO_CLASSES, lookup_table(dict(enumerate(COCO_FINE_TO_COARSE))), coco_pairs,
                            crop=True, resolution="512", values=len(COCO_FINE_TO_COARSE)),
    "cityscapes": Preset(CITYSCAPES_CLASSES, lookup_table({CITYSCAPES_FIRST_ID + c: c for c in
                                                           range(len(CITYSCAPES_CLASSES))}),
                         cityscapes_pairs, crop=True, resolution="512", values=CITYSCAPES_VALUES,
                         colours=tuple(CITYSCAPES_COLOURS[name] for name in CITYSCAPES_CLASSES)),
    "ade20k": Preset(ADE20K_CLASSES, shifted(len(ADE20K_CLASSES)), ade20k_pairs, crop=False, resolution="native",
                     values=len(ADE20K_CLASSES) + 1),
    "pascal-context-59": Preset(PASCAL_CONTEXT_CLASSES, shifted(len(PASCAL_CONTEXT_CLASSES)), pascal_context_pairs,
                                crop=False, resolution="native", values=len(PASCAL_CONTEXT_CLASSES) + 1),
    "pascal-context-459": Preset(PASCAL_CONTEXT_459_CLASSES,
                                 lookup_table({c: c for c in range(len(PASCAL_CONTEXT_459_CLASSES))}, IGNORE_16),
                                 pascal_context_459_pairs, crop=False, resolution="native",
                                 values=len(PASCAL_CONTEXT_459_CLASSES), label_format=SIXTEEN_BIT),
    "coco-stuff-171": Preset(COCO_171_CLASSES, lookup_table(COCO_FINE_TO_171), coco_pairs, crop=False,
                             resolution="native", values=len(COCO_FINE_CLASSES)),
    "cityscapes-19": Preset(tuple(CITYSCAPES_19.values()),
                            lookup_table({label: c for c, label in enumerate(CITYSCAPES_19)}), cityscapes_pairs,
                            crop=False, resolution="native", values=CITYSCAPES_VALUES,
                            colours=tuple(CITYSCAPES_COLOURS[name] for name in CITYSCAPES_19.values())),
}
DATASETS = (*PRESETS, "folder")  # "folder": images/<stem>.<ext> with labels/<stem>.png of class ids


def label_format_of(dataset: str) -> LabelFormat:
    """How the label maps of `dataset` hold their values: a preset's format; a folder's are 8-bit."""
    return PRESETS[dataset].label_format if dataset in PRESETS else EIGHT_BIT


def dataset_samples(dataset: str, root, list_file=None) -> list[Sample]:
    """The (image, label) pairs of a dataset under `root`, sorted by stem; `list_file` keeps the listed ones."""
    if dataset not in DATASETS:
        raise EvaluationError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"--root {shown(root)}: no such folder")
    preset = PRESETS.get(dataset)
    pairs = preset.reader(root) if preset else folder_pairs(root)
    samples = [Sample(image.stem, image, label, preset is not None and preset.crop) for image, label in pairs]
    check_unique(samples)
    if list_file is not None:
        samples = listed(samples, Path(list_file))
    if not samples:
        raise EvaluationError(f"{dataset} under {shown(root)}: no images (an empty dataset)")
    return sorted(samples, key=lambda s: s.stem)
