/**
 * The kiln-tiny scorer (bench/tiny-world.ts) on images whose answer is known: rendered world
 * images score as what was drawn, and images that are not what a caption says score as wrong.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../../src/engine/rng.js';
import {
  COLORS, COLOR_NAMES, accuracy, captionFor, emptyTally, randomWorldImage, renderWorldImage, scoreImage,
  tallyImage, worldCaptions, type WorldImage,
} from '../../bench/tiny-world.js';

test('rendered world images score as drawn: every attribute, 60 random images and each shape x size x position', () => {
  const rng = createRng(5);
  const images: WorldImage[] = Array.from({ length: 60 }, () => randomWorldImage(rng));
  for (let shape = 0; shape < 3; shape++) {
    for (let size = 0; size < 2; size++) {
      for (let pos = 0; pos < 5; pos++) images.push({ bg: 6, fg: 7, shape, size, pos });
    }
  }
  for (const image of images) {
    const s = scoreImage(renderWorldImage(image), 256, 256);
    assert.deepEqual(s, image, JSON.stringify(image));
  }
});

test('scorer: a plain background has no foreground; a wrong colour, shape or place scores as wrong', () => {
  const plain = renderWorldImage({ bg: 2, fg: 2, shape: 0, size: 0, pos: 0 });
  assert.deepEqual(scoreImage(plain, 256, 256), { bg: 2, fg: null, shape: null, size: null, pos: null });

  const item = captionFor({ bg: 2, fg: 0, shape: 0, size: 1, pos: 1 }, createRng(1));
  const drawn = (image: WorldImage) => scoreImage(renderWorldImage(image), 256, 256);
  const wrongOf = (image: WorldImage) => tallyImage(emptyTally(), { ...item, stated: { bg: true, fg: true, shape: true, size: true, pos: true } }, drawn(image));
  assert.deepEqual(wrongOf({ bg: 2, fg: 0, shape: 0, size: 1, pos: 1 }), []);
  assert.deepEqual(wrongOf({ bg: 3, fg: 0, shape: 0, size: 1, pos: 1 }), ['bg']);
  assert.deepEqual(wrongOf({ bg: 2, fg: 5, shape: 0, size: 1, pos: 1 }), ['fg']);
  assert.deepEqual(wrongOf({ bg: 2, fg: 0, shape: 2, size: 1, pos: 1 }), ['shape']);
  assert.deepEqual(wrongOf({ bg: 2, fg: 0, shape: 0, size: 0, pos: 4 }), ['size', 'pos']);

  // Two blobs: the larger one decides; noise around it does not change the verdict.
  const pixels = renderWorldImage({ bg: 6, fg: 0, shape: 1, size: 1, pos: 0 });
  for (let y = 2; y < 20; y++) for (let x = 2; x < 20; x++) pixels.set(COLORS.blue, (y * 256 + x) * 3);
  assert.deepEqual(scoreImage(pixels, 256, 256), { bg: 6, fg: 0, shape: 1, size: 1, pos: 0 });
});

test('captions: every form, only stated attributes counted, the same list for the same seed', () => {
  const list = worldCaptions(400, 777);
  assert.deepEqual(worldCaptions(400, 777), list);
  assert.notDeepEqual(worldCaptions(20, 778), list.slice(0, 20));
  for (const { caption, stated, image } of list) {
    assert.ok(image.fg !== image.bg, caption);
    assert.ok(caption.includes(COLOR_NAMES[image.fg]!), caption);
    assert.equal(stated.bg, caption.endsWith(' background'), caption);
    assert.equal(stated.pos, caption.includes(' at the '), caption);
    assert.equal(stated.size, /\b(small|large)\b/.test(caption), caption);
  }
  const forms = new Set(list.map(({ caption }) => (caption.includes(' that is ') ? 'that-is' : caption.endsWith(' background') ? 'on-a' : caption.startsWith('a') ? 'a-shape' : 'bare')));
  assert.equal(forms.size, 4);
  // A tally counts an attribute only where stated.
  const tally = emptyTally();
  for (const item of list) tallyImage(tally, item, item.image);
  const acc = accuracy(tally);
  assert.deepEqual(acc, { bg: 1, fg: 1, shape: 1, size: 1, pos: 1 });
  assert.ok(tally.totals.pos > 150 && tally.totals.pos < 250, String(tally.totals.pos));
  assert.equal(tally.totals.fg, 400);
});
