// The edit canvas: the uploaded picture, and above it a mask painted with the pointer (brush,
// eraser, size, clear, invert). Both canvases have the picture's own pixel size (CSS scales
// them), so the mask sent has the image's dimensions, as the API requires.

// Shown at 60% opacity over the picture (style.css); only the alpha is sent.
const PAINT = '#ffffff';

export class MaskEditor {
  constructor(imageCanvas, maskCanvas) {
    this.imageCanvas = imageCanvas;
    this.maskCanvas = maskCanvas;
    this.ctx = maskCanvas.getContext('2d');
    this.tool = 'brush';
    this.size = 32;
    this.scale = 1;
    this.last = null;
    this.painted = false;
    maskCanvas.addEventListener('pointerdown', (e) => this.#down(e));
    maskCanvas.addEventListener('pointermove', (e) => this.#move(e));
    for (const type of ['pointerup', 'pointercancel', 'lostpointercapture']) maskCanvas.addEventListener(type, () => (this.last = null));
  }

  /** Shows `bitmap` (an ImageBitmap of the upload) and starts an empty mask, or `mask` (a bitmap of a stored one). */
  load(bitmap, mask) {
    for (const canvas of [this.imageCanvas, this.maskCanvas]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    this.imageCanvas.getContext('2d').drawImage(bitmap, 0, 0);
    this.clear();
    if (mask) this.#fromBlackWhite(mask);
  }

  get width() {
    return this.maskCanvas.width;
  }

  get height() {
    return this.maskCanvas.height;
  }

  clear() {
    this.ctx.clearRect(0, 0, this.width, this.height);
    this.painted = false;
  }

  /** Painted becomes unpainted and the other way round. */
  invert() {
    const { ctx } = this;
    ctx.save();
    ctx.globalCompositeOperation = 'xor';
    ctx.fillStyle = PAINT;
    ctx.fillRect(0, 0, this.width, this.height);
    ctx.restore();
    this.painted = true;
  }

  /** Whether any pixel is painted. */
  isEmpty() {
    const { data } = this.ctx.getImageData(0, 0, this.width, this.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return false;
    return true;
  }

  /** The mask as the API reads one without transparency: white is repainted, black kept (PNG). */
  toBlob() {
    const { data } = this.ctx.getImageData(0, 0, this.width, this.height);
    const out = new ImageData(this.width, this.height);
    for (let i = 0; i < data.length; i += 4) {
      const v = data[i + 3] >= 128 ? 255 : 0;
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    const canvas = document.createElement('canvas');
    canvas.width = this.width;
    canvas.height = this.height;
    canvas.getContext('2d').putImageData(out, 0, 0);
    return new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
  }

  #fromBlackWhite(bitmap) {
    const canvas = document.createElement('canvas');
    canvas.width = this.width;
    canvas.height = this.height;
    const c = canvas.getContext('2d');
    c.drawImage(bitmap, 0, 0, this.width, this.height);
    const { data } = c.getImageData(0, 0, this.width, this.height);
    const paint = this.ctx.createImageData(this.width, this.height);
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] >= 128) {
        paint.data.set([255, 255, 255, 255], i);
        this.painted = true;
      }
    }
    this.ctx.putImageData(paint, 0, 0);
  }

  /** The pointer's position in the canvas's own pixels. */
  #point(e) {
    const r = this.maskCanvas.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * this.width) / r.width, y: ((e.clientY - r.top) * this.height) / r.height };
  }

  #down(e) {
    if (e.button !== 0) return;
    this.maskCanvas.setPointerCapture?.(e.pointerId);
    // The brush size is in screen pixels: the same on a small picture and a large one.
    this.scale = this.width / this.maskCanvas.getBoundingClientRect().width;
    this.last = this.#point(e);
    this.#stroke(this.last, this.last);
    e.preventDefault();
  }

  #move(e) {
    if (!this.last) return;
    const p = this.#point(e);
    this.#stroke(this.last, p);
    this.last = p;
  }

  #stroke(from, to) {
    const { ctx } = this;
    ctx.save();
    ctx.globalCompositeOperation = this.tool === 'eraser' ? 'destination-out' : 'source-over';
    ctx.strokeStyle = ctx.fillStyle = PAINT;
    ctx.lineWidth = this.size * (this.scale || 1);
    ctx.lineCap = ctx.lineJoin = 'round';
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.restore();
    if (this.tool === 'brush') this.painted = true;
  }
}
