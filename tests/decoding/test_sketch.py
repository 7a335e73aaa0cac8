"""sketch_generate: its settings object and the keywords that build it give the same outline and text;
bad settings are refused before the LLM is asked."""

import pytest

import logitfuse


def test_settings_object_and_keywords_agree(slm, llm_model, tok):
    llm = logitfuse.HFLLM(llm_model, tok)
    by_keywords = logitfuse.sketch_generate(llm, slm, "Write an invitation.", "My name is Martin.", slm_tokenizer=tok,
                                            outline_max_new_tokens=3, apply_chat_template=False, max_new_tokens=2)
    settings = logitfuse.SketchSettings(outline_max_new_tokens=3, apply_chat_template=False)
    by_object = logitfuse.sketch_generate(llm, slm, "Write an invitation.", "My name is Martin.", slm_tokenizer=tok,
                                          settings=settings, max_new_tokens=2)
    assert (by_keywords.outline_ids, by_keywords.output_ids) == (by_object.outline_ids, by_object.output_ids)
    assert len(by_object.outline_ids) <= 3 and len(by_object.output_ids) <= 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(outline_max_new_tokens=0), ValueError, "outline_max_new_tokens"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(outline_prompt=3), TypeError, "outline_prompt"),
    (dict(settings={"outline_max_new_tokens": 3}), TypeError, "SketchSettings"),
])
def test_bad_settings_are_refused_before_the_llm_is_asked(slm, llm_model, tok, kwargs, error, match):
    llm = logitfuse.HFLLM(llm_model, tok)
    with pytest.raises(error, match=match):
        logitfuse.sketch_generate(llm, slm, "Write an invitation.", "My name is Martin.", slm_tokenizer=tok, **kwargs)
    assert llm.audit_log == []
