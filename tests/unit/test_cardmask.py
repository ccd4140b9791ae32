"""Card number masking (`maskCreditCardNumbers`): Luhn-valid 13–19 digit numbers, with spaces or
dashes, keep only their last four digits; nothing else is touched."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.cardmask import (
    card_number_spans,
    luhn_valid,
    mask_card_numbers,
    mask_content,
    mask_strings,
)
from shared.sunco import (
    CarouselContent,
    FormContent,
    FormField,
    FormOption,
    FormResponseContent,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
)

DIGITS = "0123456789"


def with_check_digit(body: str) -> str:
    """`body` plus the digit that makes it pass Luhn."""
    for check in DIGITS:
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


@st.composite
def card_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """(the number as written, its digits): 13–19 Luhn-valid digits, maybe in groups."""
    length = draw(st.integers(13, 19))
    digits = with_check_digit(draw(st.text(DIGITS, min_size=length - 1, max_size=length - 1)))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=5)))
    parts = [digits[a:b] for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
    written = parts[0]
    for part in parts[1:]:
        written += draw(st.sampled_from(" -")) + part
    return written, digits


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
MIXED = st.text(DIGITS + " -abc.:/+", max_size=80)


def test_examples() -> None:
    assert mask_card_numbers("my card is 4111 1111 1111 1111, exp 12/25") == \
        "my card is **** **** **** 1111, exp 12/25"
    assert mask_card_numbers("4111-1111-1111-1111") == "****-****-****-1111"
    assert mask_card_numbers("4111.1111.1111.1111") == "****.****.****.1111"
    assert mask_card_numbers("4111\u00a01111\u00a01111\u00a01111") == "****\u00a0****\u00a0****\u00a01111"
    assert mask_card_numbers("4111\u20091111 1111 1111") == "****\u2009**** **** 1111"
    assert mask_card_numbers("v1.2.3 at 10.0.0.1") == "v1.2.3 at 10.0.0.1"
    assert mask_card_numbers("amex 378282246310005!") == "amex ***********0005!"
    assert mask_card_numbers("4111111111111112") == "4111111111111112"  # fails Luhn
    assert mask_card_numbers("My tracking number is TL12345678") == "My tracking number is TL12345678"
    assert mask_card_numbers("call +1 415 555 2671") == "call +1 415 555 2671"
    assert mask_card_numbers("41111111111111111111") == "41111111111111111111"  # 20 digits: not a card
    # A card next to other numbers is masked whatever the grouping reads.
    assert mask_card_numbers("4111 1111 1111 1111 1234").endswith("1111 1234")
    assert "4111" not in mask_card_numbers("4111 1111 1111 1111 1234")
    assert mask_card_numbers("٤١١١ ١١١١ ١١١١ ١١١١") == "٤١١١ ١١١١ ١١١١ ١١١١"  # not ASCII digits


@given(MIXED)
def test_never_masks_digits_outside_a_luhn_valid_number(text: str) -> None:
    masked = mask_card_numbers(text)
    spans = card_number_spans(text)
    for start, end in spans:
        digits = "".join(c for c in text[start:end] if c in DIGITS)
        assert 13 <= len(digits) <= 19 and luhn_valid(digits)
    assert len(masked) == len(text)
    for index, (before, after) in enumerate(zip(text, masked, strict=True)):
        if before == after:
            continue
        assert before in DIGITS and after == "*"
        # Inside a valid number and not among its last four digits.
        assert any(start <= index < end and sum(c in DIGITS for c in text[index + 1:end]) >= 4
                   for start, end in spans)
    if not spans:
        assert masked == text


@given(card_numbers(), TEXT, TEXT)
def test_always_masks_a_valid_number_in_any_surrounding_text(card: tuple[str, str], before: str,
                                                               after: str) -> None:
    written, digits = card
    # A digit touching the number would make it a longer number: that is another text.
    before, after = before.rstrip(DIGITS), after.lstrip(DIGITS)
    text = before + written + after
    masked = mask_card_numbers(text)
    region = masked[len(before):len(before) + len(written)]
    region_digits = [c for c in region if c != " " and c != "-"]
    assert len(region_digits) == len(digits)
    assert all(c == "*" for c in region_digits[:-4])
    assert all(c == "*" or c == d for c, d in zip(region_digits[-4:], digits[-4:], strict=True))


@given(MIXED)
def test_masking_is_idempotent(text: str) -> None:
    once = mask_card_numbers(text)
    assert mask_card_numbers(once) == once


def test_mask_content_covers_what_a_person_reads_and_leaves_urls() -> None:
    pan = "4242 4242 4242 4242"
    text = TextContent(text=f"card {pan}", markdown_text=f"**{pan}**", payload=pan,
                       actions=[ReplyAction(text=pan, payload="p"), LinkAction(text="open", uri="https://x/4242424242424242")])
    masked = mask_content(text)
    assert isinstance(masked, TextContent)
    assert masked.text == "card **** **** **** 4242" and masked.markdown_text == "****** **** **** 4242**"
    assert masked.payload == pan  # the business's own id
    assert masked.actions is not None and masked.actions[0].text == "**** **** **** 4242"
    assert isinstance(masked.actions[1], LinkAction) and masked.actions[1].uri == "https://x/4242424242424242"
    image = mask_content(ImageContent(media_url="https://cdn/4242424242424242.png", text=pan, alt_text=pan))
    assert isinstance(image, ImageContent) and image.media_url == "https://cdn/4242424242424242.png"
    assert image.text == image.alt_text == "**** **** **** 4242"
    template = mask_content(TemplateContent(template={"name": "t", "components": [
        {"parameters": [{"type": "text", "text": f"paid with {pan}"}]}]}))
    assert isinstance(template, TemplateContent)
    assert template.template["components"][0]["parameters"][0]["text"] == "paid with **** **** **** 4242"
    assert mask_strings({"a": [pan, 1, None]}) == {"a": ["**** **** **** 4242", 1, None]}


def test_mask_content_covers_cards_lists_forms_and_form_answers() -> None:
    pan = "4242 4242 4242 4242"
    masked_pan = "**** **** **** 4242"
    item = Item(title=f"card {pan}", description=pan, media_url="https://cdn/4242424242424242.png",
                actions=[PostbackAction(text=pan, payload=pan)])
    carousel = mask_content(CarouselContent(items=[item], text=pan))
    assert isinstance(carousel, CarouselContent) and carousel.text == masked_pan
    [card] = carousel.items
    assert (card.title, card.description, card.actions[0].text) == (f"card {masked_pan}", masked_pan, masked_pan)
    assert card.media_url == item.media_url and isinstance(card.actions[0], PostbackAction)
    assert card.actions[0].payload == pan  # the business's own id
    listed = mask_content(ListContent(items=[item], actions=[PostbackAction(text=pan, payload="p")]))
    assert isinstance(listed, ListContent) and listed.actions is not None and listed.actions[0].text == masked_pan
    answer = mask_content(FormResponseContent(text_fallback=f"Card: {pan}", fields=[
        FormField(type="text", name="card", label="Card", text=pan),
        FormField(type="select", name="saved", label="Saved", select=[FormOption(name="s", label=pan)])]))
    assert isinstance(answer, FormResponseContent) and answer.text_fallback == f"Card: {masked_pan}"
    assert answer.fields[0].text == masked_pan and answer.fields[1].select is not None
    assert answer.fields[1].select[0].label == masked_pan and answer.fields[1].select[0].name == "s"
    form = mask_content(FormContent(fields=[FormField(type="text", name="n", label=pan, placeholder=pan)]))
    assert isinstance(form, FormContent) and form.fields[0].label == form.fields[0].placeholder == masked_pan
