"""Reference token ids from transformers' slow CLIPTokenizer (as diffusers runs it without ftfy)
for text beyond ASCII: accents, CJK, other scripts, emoji, mixed scripts, odd whitespace and
control characters. Writes test/fixtures/clip-tokenizer-ids.json, which test/tokenizer.test.ts
checks Kiln's tokenizer against.

Run in the oracle environment (../shared/oracle/README.md):
  source ../shared/oracle/env.sh SRC_DIR; /usr/bin/python3 tools/oracle/clip_tokenizer_ids.py test/fixtures/clip-tokenizer-ids.json
"""
import json, os, shutil, sys, tempfile
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'shared', 'oracle'))
import oracle_compat
oracle_compat.patch_added_token()
import transformers
from transformers import CLIPTokenizer

TEXTS = [
    # accents and case
    'café', 'naïve résumé', 'Crème brûlée', 'São Paulo', 'Zürich', 'ÉCOLE NORMALE', 'façade', 'Ångström',
    'cafe\u0301 (decomposed)', 'Tiếng Việt', 'Łódź', 'İstanbul', 'STRASSE straße', 'ΟΔΟΣ Ελληνικά', 'ǅemal', 'ﬁne ligature',
    # other scripts
    'Москва зимой', 'مرحبا بالعالم', 'שלום עולם', 'नमस्ते दुनिया', 'สวัสดีครับ', 'ქართული', 'Հայերեն',
    # CJK: ideographs are split apart, kana and hangul are not
    '一只猫坐在桌子上', '猫が好きです', 'カタカナとひらがな', '고양이가 좋아요', '𠀀𠀁 extension B', '豈 compatibility', 'ＡＢＣ１２３ full width',
    # emoji
    '🐱 cat 🐶 dog', '🐱cat', '👨\u200d👩\u200d👧 family', '🇯🇵 🇫🇷 flags', '👍🏽 thumbs', '❤️ red heart', '✨✨✨ sparkles',
    # mixed scripts
    'a cat 猫 and a dog 犬 in Tokyo 東京', 'Café ☕ in Paris 🇫🇷', 'neon sign saying "営業中" at night, 4k', 'пейзаж, oil painting, 油画',
    # numbers and symbols beyond ASCII
    '٣ cats and ½ apple', 'x² + y² = z²', 'Ⅻ o\'clock', '№ 5 · 100 € · 50 ¥', '— em dash – en dash … ellipsis',
    # whitespace and control characters
    'a\u3000cat\u2003in\u00a0the\u2009sun', 'a\tcat\nin\r\nthe  sun', 'ca\u200bt and \ufeffdog', 'a\u0085cat', 'a\u2028cat\u2029dog',
    'ca\u200dt', '\u0301 leading combining mark', 'tab\t\t\tend\t', '\u0000nul\u0007bell',
    # special tokens in text, and "!" (tokenizer_2's pad token)
    'a cat<|endoftext|>a dog', 'A<|ENDOFTEXT|>b', '猫! wow!! 🎉!', 'hello!world',
]

vocab = os.path.join(HERE, '..', 'data', 'clip-tokenizer')
out = {'transformers': transformers.__version__, 'tokenizer': 'CLIPTokenizer (slow), no ftfy; tokenizer pads with <|endoftext|>, tokenizer_2 with "!"', 'cases': []}
with tempfile.TemporaryDirectory() as tmp:
    toks = {}
    for name, pad in [('tokenizer', '<|endoftext|>'), ('tokenizer_2', '!')]:
        d = os.path.join(tmp, name)
        os.mkdir(d)
        for f in ['vocab.json', 'merges.txt']:
            shutil.copy(os.path.join(vocab, f), d)
        toks[name] = CLIPTokenizer(os.path.join(d, 'vocab.json'), os.path.join(d, 'merges.txt'), pad_token=pad)
    for text in TEXTS:
        out['cases'].append({'text': text, **{name: t(text)['input_ids'] for name, t in toks.items()}})
with open(sys.argv[1], 'w', encoding='utf-8') as f:  # one case per line
    head = {k: v for k, v in out.items() if k != 'cases'}
    f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n')
    f.write(',\n'.join(json.dumps(c, ensure_ascii=False) for c in out['cases']))
    f.write('\n]}\n')
print(len(TEXTS), 'texts')
