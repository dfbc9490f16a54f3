"""The PP-OCR text-line task shared by the benchmark scripts: the PP-OCRv4 recognizer shipped in the
``rapidocr-onnxruntime`` wheel, text lines rendered with Pillow, rapidocr's own preprocessing
(``TextRecognizer.resize_norm_img``) and CTC decoding (``CTCLabelDecode`` with the character list stored in the
model's metadata), and character accuracy (1 - normalized edit distance) as the metric.

Needs (experiments only): pip install rapidocr-onnxruntime pillow
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from _common import dist_version, session

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("invoice total amount date paid order number customer address street city phone account balance "
         "payment due item price quantity receipt station ticket gate platform delivery tracking code "
         "reference office north south river market").split()


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_accuracy(pred: str, truth: str) -> float:
    return 1.0 - levenshtein(pred, truth) / max(len(pred), len(truth), 1)


class OcrData:
    """Rendered text lines (eval and calibration), with rapidocr's preprocessing and decoding.

    ``sort_kind``: the numpy sort that orders lines by aspect ratio before batching, as rapidocr's
    ``TextRecognizer.__call__`` does (lines of equal ratio may land in other batches with another kind)."""

    def __init__(self, seed: int, n_eval: int, n_calib: int, calib_width: int = 320, calib_batch: int = 8,
                 eval_batch: int = 6, sort_kind: str = "stable"):
        from PIL import ImageFont  # noqa: F401  (fail early when Pillow is missing)
        import rapidocr_onnxruntime
        from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer
        from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

        pkg = Path(rapidocr_onnxruntime.__file__).parent
        self.model_path = pkg / "models" / "ch_PP-OCRv4_rec_infer.onnx"
        self.version = dist_version("rapidocr-onnxruntime")
        meta = {p.key: p.value for p in onnx.load(str(self.model_path), load_external_data=False).metadata_props}
        # exactly what rapidocr does: the model's 'character' metadata, then CTCLabelDecode adds blank and space
        self.decoder = CTCLabelDecode(character=meta["character"].splitlines())
        self.rec_shape = [3, 48, 320]  # rapidocr config.yaml Rec.rec_img_shape
        self._resize_norm = types.MethodType(TextRecognizer.resize_norm_img,
                                             types.SimpleNamespace(rec_image_shape=self.rec_shape))
        self.fonts = [str(p) for p in sorted(FONT_DIR.glob("DejaVu*.ttf")) if "ExtraLight" not in p.name]
        if not self.fonts:
            raise RuntimeError(f"no DejaVu TTF font in {FONT_DIR}: apt-get install fonts-dejavu-core")
        self.rng = np.random.default_rng(seed)
        self.eval_batch = eval_batch
        self.sort_kind = sort_kind
        eval_lines = [self._line(i) for i in range(n_eval)]
        self.texts = [t for t, _ in eval_lines]
        self.images = [im for _, im in eval_lines]
        calib_lines = [self._line(i) for i in range(n_calib)]
        norm = [self._resize_norm(im, calib_width / 48) for _, im in calib_lines]  # fixed padded width
        self.calib = [np.stack(norm[i:i + calib_batch]).astype(np.float32) for i in range(0, n_calib, calib_batch)]
        self.ratios = np.array([im.shape[1] / im.shape[0] for im in self.images])
        self.hard = np.array([i % 2 == 1 for i in range(n_eval)])

    def _text(self) -> str:
        rng, parts = self.rng, []
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 4))
            if kind == 0:
                parts.append("".join(rng.choice(list("0123456789"), int(rng.integers(2, 8)))))
            elif kind == 1:
                parts.append(str(rng.choice(WORDS)).capitalize() if rng.random() < 0.5 else str(rng.choice(WORDS)))
            elif kind == 2:
                parts.append("".join(rng.choice(list(LETTERS.upper() + "0123456789"), int(rng.integers(3, 8)))))
            else:
                parts.append("".join(rng.choice(list(LETTERS), int(rng.integers(3, 9)))))
        return " ".join(parts)

    def _line(self, i: int) -> tuple[str, np.ndarray]:
        """Text on a flat background; odd lines are hard: low contrast, darker background, more blur / noise."""
        from PIL import Image, ImageDraw, ImageFilter, ImageFont

        rng, hard = self.rng, i % 2 == 1
        text = self._text()
        font = ImageFont.truetype(self.fonts[int(rng.integers(len(self.fonts)))], int(rng.integers(22, 40)))
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left + 20, bottom - top + 16
        bg = rng.uniform(0.3, 0.9) if hard else rng.uniform(0.8, 1.0)
        fg = max(0.0, bg - (rng.uniform(0.15, 0.5) if hard else rng.uniform(0.6, 1.0)))
        img = Image.new("L", (w, h), int(bg * 255))
        ImageDraw.Draw(img).text((10 - left, 8 - top), text, font=font, fill=int(fg * 255))
        img = img.rotate(float(rng.uniform(-4, 4)), resample=Image.BILINEAR, fillcolor=int(bg * 255))
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.6 if hard else 0.8))))
        a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 14 if hard else 5), (h, w))
        rgb = np.clip(np.clip(a, 0, 255)[..., None] * rng.uniform(0.85, 1.15, 3), 0, 255).astype(np.uint8)
        return text, rgb  # (h, w, 3) uint8, as cv2.imread gives rapidocr a crop

    def calibration(self):
        for x in self.calib:
            yield {"x": x}

    def latency_feed(self, n: int = 6, width: int = 320) -> dict[str, np.ndarray]:
        """The first n eval lines at a fixed padded width (rapidocr's rec_batch_num is 6)."""
        return {"x": np.stack([self._resize_norm(self.images[i], width / 48) for i in range(n)]).astype(np.float32)}

    def recognize(self, sess: ort.InferenceSession, idx=None) -> dict[int, str]:
        """rapidocr's TextRecognizer.__call__ loop over the given lines (default: all): sort by aspect ratio,
        batches of rec_batch_num (6) padded to the batch's widest line, CTC decode. Line index -> text."""
        idx = np.arange(len(self.images)) if idx is None else np.asarray(idx)
        order = idx[np.argsort(self.ratios[idx], kind=self.sort_kind)]
        pred: dict[int, str] = {}
        for b in range(0, len(order), self.eval_batch):
            ids = order[b:b + self.eval_batch]
            max_ratio = max(self.rec_shape[2] / self.rec_shape[1], float(self.ratios[ids].max()))
            x = np.stack([self._resize_norm(self.images[i], max_ratio) for i in ids]).astype(np.float32)
            for i, (text, _) in zip(ids, self.decoder(sess.run(None, {"x": x})[0])):
                pred[int(i)] = text
        return pred

    def score_items(self, sess: ort.InferenceSession, idx) -> np.ndarray:
        """Per-line character accuracy of the given lines, in their order."""
        pred = self.recognize(sess, idx)
        return np.array([char_accuracy(pred[int(i)], self.texts[int(i)]) for i in idx])

    def texts_read(self, model_path, threads: int = 2) -> list[str]:
        """What the model at ``model_path`` reads on every eval line, in line order."""
        pred = self.recognize(session(model_path, threads))
        return [pred[i] for i in range(len(self.images))]

    def scores(self, model_path, threads: int = 2) -> np.ndarray:
        return self.score_items(session(model_path, threads), np.arange(len(self.images)))

    def evaluate(self, model_path: str) -> float:
        return float(self.scores(model_path).mean())
