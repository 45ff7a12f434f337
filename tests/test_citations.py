"""Citations that mean something: each sentence checked against the sources.

The labelled pairs below calibrate the support threshold: claims as a small model writes them
(copied, reworded, with a changed number, a flipped negation, about another source) against real
passages (the demo handbook, Python's documentation, Linux manual pages).
"""

from __future__ import annotations

import pytest

from lorekeeper.server import citations
from lorekeeper.server.citations import SUPPORT_THRESHOLD, calibrate, check_answer, support_score

HOLIDAY = (
    "## Holidays\nNew staff get 25 days of paid holiday a year, plus public holidays. After three full "
    "years with the co-operative this rises to 28 days. Up to five unused days may be carried into the "
    "next year; the rest lapse on 31 March."
)
EQUIPMENT = (
    "## Equipment\nEvery member of staff gets a laptop on their first day. Lost or broken equipment is "
    "reported to the facilities desk (extension 214) within one working day."
)
BIKE = "The bicycle chain should be lubricated every 300 kilometres.\nTyre pressure for the road bike is 6.5 bar."
VENV = (
    "The venv module supports creating lightweight virtual environments, each with their own independent "
    "set of Python packages installed in their site directories. A virtual environment is created on top "
    "of an existing Python installation, known as the virtual environment's base Python, and may optionally "
    "be isolated from the packages in the base environment."
)
SIGNAL = (
    "SIGKILL      P1990      Term    Kill signal\n"
    "The signals SIGKILL and SIGSTOP cannot be caught, blocked, or ignored.\n"
    "Signal  x86/ARM most others\nSIGKILL     9"
)
OPEN = (
    "The open() system call opens the file specified by pathname. If the specified file does not exist, "
    "it may optionally (if O_CREAT is specified in flags) be created by open().\n"
    "O_CREAT If pathname does not exist, create it as a regular file.\n"
    "ENOENT O_CREAT is not set and the named file does not exist."
)
JSON_DUMPS = (
    "json.dumps(obj, *, skipkeys=False, ensure_ascii=True) Serialize obj to a JSON formatted str. "
    "If ensure_ascii is true (the default), the output is guaranteed to have all incoming non-ASCII "
    "characters escaped."
)
LS = "-a, --all\n  do not ignore entries starting with .\n-r, --reverse\n  reverse order while sorting"
GARDEN = "Tomatoes need six hours of sun and deep watering twice a week. Basil should be pinched weekly."
BREAD = "Feed the starter twice a day. Bake the loaf at 250 degrees for forty minutes."
MEETING = "Meeting notes: the quarterly budget review moved to Thursday."

LABELLED = [  # (claim, source, supported?)
    ("New staff get 25 days of paid holiday a year.", HOLIDAY, True),
    ("After three years, staff get 28 days of holiday.", HOLIDAY, True),
    ("After three full years this rises to 30 days.", HOLIDAY, False),
    ("Up to five unused days can be carried over to the next year.", HOLIDAY, True),
    ("Unused days lapse on 31 March.", HOLIDAY, True),
    ("Unused days lapse on 31 April.", HOLIDAY, False),
    ("New staff get 25 days of paid holiday a year.", EQUIPMENT, False),
    ("Staff may take unlimited paid holiday.", HOLIDAY, False),
    ("Every member of staff gets a laptop on their first day.", EQUIPMENT, True),
    ("Lost equipment must be reported to the facilities desk on extension 214.", EQUIPMENT, True),
    ("Report broken equipment to extension 241.", EQUIPMENT, False),
    ("Staff who lose equipment should tell facilities within one working day.", EQUIPMENT, True),
    ("The chain should be oiled every 300 km.", BIKE, True),
    ("The bicycle chain is lubricated every 300 kilometres.", BIKE, True),
    ("Tyre pressure for the road bike is 6.5 bar.", BIKE, True),
    ("The road bike tyres need 8 bar.", BIKE, False),
    ("The venv module creates lightweight virtual environments.", VENV, True),
    ("Each virtual environment has its own independent set of Python packages.", VENV, True),
    ("A virtual environment is created on top of an existing Python installation.", VENV, True),
    ("Python packages are installed in site directories.", VENV, True),
    ("Use python -m venv --env_name=myenv to create it.", VENV, False),
    ("The CA certificates are stored in /etc/ssl/certs/venv.pem.", VENV, False),
    ("Virtual environments are always isolated from the base environment.", VENV, False),
    ("The signals SIGKILL and SIGSTOP cannot be caught, blocked, or ignored.", SIGNAL, True),
    ("SIGKILL can be caught by a signal handler.", SIGNAL, False),
    ("SIGKILL is signal number 9.", SIGNAL, True),
    ("SIGKILL is signal number 15.", SIGNAL, False),
    ("If the file does not exist, O_CREAT creates it as a regular file.", OPEN, True),
    ("ENOENT is returned when O_CREAT is not set and the file does not exist.", OPEN, True),
    ("open returns EACCES when the file does not exist.", OPEN, False),
    ("json.dumps serializes obj to a JSON formatted str.", JSON_DUMPS, True),
    ("With ensure_ascii true, non-ASCII characters are escaped.", JSON_DUMPS, True),
    ("json.dumps writes the output to a file.", JSON_DUMPS, False),
    ("-r reverses the sort order.", LS, True),
    ("The --all option hides hidden files.", LS, False),
    ("The quarterly budget review moved to Thursday.", HOLIDAY, False),
    ("The quarterly budget review moved to Thursday.", MEETING, True),
    ("The budget review is on Friday.", MEETING, False),
    ("Tomatoes need six hours of sun.", GARDEN, True),
    ("Tomatoes need four hours of sun.", GARDEN, False),
    ("Basil should be pinched every week.", GARDEN, True),
    ("Bake the loaf at 250 degrees for forty minutes.", BREAD, True),
    ("Bake the loaf at 220 degrees.", BREAD, False),
    ("Feed the starter twice a day.", BREAD, True),
    ("The starter needs feeding once a week.", BREAD, False),
]


def test_the_labelled_set_is_large_and_balanced_enough_to_calibrate_on() -> None:
    labels = [label for _, _, label in LABELLED]
    assert len(LABELLED) >= 40 and 0.35 <= sum(labels) / len(labels) <= 0.65


def test_the_threshold_is_the_calibrated_one_and_precise() -> None:
    accuracy = calibrate(LABELLED, [t / 20 for t in range(6, 20)])
    best = max(accuracy.values())
    assert accuracy[SUPPORT_THRESHOLD] == best, accuracy  # the shipped threshold is a best one
    assert best >= 0.9
    predicted = [(support_score(c, s) >= SUPPORT_THRESHOLD, label) for c, s, label in LABELLED]
    true_pos = sum(p and label for p, label in predicted)
    precision = true_pos / sum(p for p, _ in predicted)
    assert precision >= 0.95  # "supported" must rarely be said of an invented claim


def test_a_true_claim_with_the_right_marker_is_cited_with_its_span() -> None:
    checked = check_answer("New staff get 25 days of paid holiday a year [1].", [HOLIDAY, EQUIPMENT])
    assert checked.cited == [1] and checked.flagged == [] and checked.supported
    (sentence,) = checked.sentences
    assert sentence.supported_by == [1] and sentence.markers == [1]
    assert sentence.span.source == 1
    assert sentence.span.text == "New staff get 25 days of paid holiday a year, plus public holidays."
    assert HOLIDAY[sentence.span.start : sentence.span.end].strip() == sentence.span.text


def test_a_marker_on_an_unrelated_source_is_flagged_and_the_right_one_added() -> None:
    answer = "Every member of staff gets a laptop on their first day [1]. Holidays are 25 days a year [2]."
    checked = check_answer(answer, [HOLIDAY, EQUIPMENT])
    first, second = checked.sentences
    assert first.flagged == [1] and first.supported_by == [2] and first.added == [2]
    assert second.flagged == [2] and second.added == [1]
    assert checked.cited == [2, 1] and checked.flagged == [1, 2]
    assert "first day [1][2]." in checked.text and "a year [2][1]." in checked.text


def test_missing_markers_are_added_where_a_source_supports_the_sentence() -> None:
    checked = check_answer("Tyre pressure for the road bike is 6.5 bar.", [GARDEN, BIKE])
    assert checked.cited == [2] and checked.text == "Tyre pressure for the road bike is 6.5 bar [2]."


def test_a_fake_source_list_is_removed() -> None:
    answer = (
        "New staff get 25 days of paid holiday a year [1].\n\nSources:\n[1] handbook.md\n"
        "[2] /docs/benefits/holidays.pdf\n[3] Employee Guide 2024"
    )
    checked = check_answer(answer, [HOLIDAY, EQUIPMENT])
    assert checked.stripped_source_list
    assert checked.text == "New staff get 25 days of paid holiday a year [1]."
    assert checked.cited == [1]  # a listed [2] or [3] makes nothing cited
    bare = check_answer("Basil should be pinched weekly [1].\n[1] garden.md\n[2] notes.txt", [GARDEN])
    assert bare.text == "Basil should be pinched weekly [1]." and bare.cited == [1]


def test_an_unsupported_answer_is_reported_as_such() -> None:
    answer = (
        "You can create one with python -m venv --env_name=myenv [1]. The certificates live in /etc/ca [2]."
    )
    checked = check_answer(answer, [VENV, OPEN])
    assert not checked.supported and checked.cited == []
    assert checked.flagged == [1, 2]


def test_markers_pointing_at_no_source_are_invalid() -> None:
    checked = check_answer("Feed the starter twice a day [1][7].", [BREAD])
    assert checked.invalid == [7] and checked.cited == [1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two sentences here. Three!", ["One.", "Two sentences here.", "Three!"]),
        ("Pressure is 6.5 bar [1]. Next one [2].", ["Pressure is 6.5 bar [1].", "Next one [2]."]),
        ("- first item\n- second item", ["- first item", "- second item"]),
        ("Use e.g. the venv module.", ["Use e.g. the venv module."]),
        (
            'It says: "Staff get 25 days." So the answer is 3.',
            ['It says: "Staff get 25 days."', "So the answer is 3."],
        ),
    ],
)
def test_sentences_are_split_where_people_would(text, expected) -> None:
    assert citations.split_sentences(text) == expected


def test_the_extractive_fallback_picks_the_sentence_that_answers() -> None:
    best = citations.best_sentence_for(
        "How many days of paid holiday do new staff get?", [EQUIPMENT, HOLIDAY]
    )
    assert best is not None and best.source == 2
    assert best.text == "New staff get 25 days of paid holiday a year, plus public holidays."


def test_a_short_sentence_stating_a_number_is_checked_like_any_claim() -> None:
    """A figure tacked on after a true sentence ("The answer is: 6") is a claim, and unsupported
    here, so the answer path warns about it; a bare list number is not a claim."""
    source = "Staff must report a lost or stolen laptop to IT within 24 hours."
    checked = check_answer("Report a lost laptop within 24 hours [1]. The answer is: 6", [source])
    first, second = checked.sentences
    assert first.claim and first.supported
    assert second.claim and not second.supported
    assert [c.supported for c in checked.claims] == [True, False]
    true_figure = check_answer("It is 24.", [source]).sentences[0]
    assert true_figure.claim and true_figure.supported_by == [1]
    listed = check_answer("1. Report a lost laptop within 24 hours.", [source])
    assert [s.claim for s in listed.sentences] == [False, True]


def test_a_sentence_that_only_restates_the_question_supports_nothing() -> None:
    """Every source holding the question's words would "support" a restatement of it; it answers
    nothing, so it is not a claim, and an answer made of it and unsupported text is unsupported. A
    sentence that adds a figure or a word of its own is still a claim."""
    question = "What error does open() fail with if I pass O_CREAT and O_EXCL and the file exists?"
    source = (
        "Pass O_CREAT to create the file. O_EXCL: if this flag is given with O_CREAT and the file exists, "
        "open() fails with the error EEXIST."
    )
    answer = (
        "The error that open() fails with if I pass O_CREAT and O_EXCL is this [1]. It is ENOVERSION 10.2.3."
    )
    checked = check_answer(answer, [source], question=question)
    assert not checked.supported and checked.flagged == [1]
    assert check_answer(answer, [source]).supported  # without the question, the restatement passes
    right = check_answer("open() fails with EEXIST [1].", [source], question=question)
    assert right.supported and right.cited == [1]
    days = check_answer("New staff get 25 days [1].", [HOLIDAY], question="How many days do new staff get?")
    assert days.supported


BC_README = (  # from GNU bc's README (Debian's /usr/share/doc/bc)
    "Extra configuration options:\n\n"
    "\t--with-readline tells bc to use the readline package that allows\n"
    "\t  for editing input lines when run interactive.\n\n"
    "\t--with-editline tells bc to use the BSD editline package that\n"
    "\t  allows for editing input lines when run interactive.\n"
)


def test_a_restated_question_ending_in_a_colon_and_the_line_that_completes_it_are_one_claim() -> None:
    """SmolLM2 answered "Which option makes bc use the BSD editline package?" with the restatement,
    a colon, and the option on the next line: a true answer the check used to reject, since alone
    the first line answers nothing and the second is one word."""
    question = "Which option makes bc use the BSD editline package?"
    right = check_answer(
        "The option that makes bc use the BSD editline package is:\n--with-editline",
        [BC_README],
        question=question,
    )
    assert right.supported and right.cited == [1]
    assert right.text.endswith("--with-editline [1]")
    wrong = check_answer(
        "The option that makes bc use the BSD editline package is:\n--with-libedit",
        [BC_README],
        question=question,
    )
    assert not wrong.supported
    listed = check_answer(
        "The options that make bc use the BSD editline package are:\n- --with-editline\n- --enable-nls",
        [BC_README], question=question,
    )  # fmt: skip
    assert [(s.claim, s.supported) for s in listed.sentences] == [(False, False), (True, True), (True, False)]


def test_a_short_sentence_naming_a_code_term_is_a_claim() -> None:
    source = (
        "O_EXCL: if this flag is given with O_CREAT and the file exists, open() fails with the error EEXIST."
    )
    assert check_answer("It is EEXIST.", [source]).supported
    assert not check_answer("It is ENOENT.", [source]).supported
    assert [s.claim for s in check_answer("OK. Sure!", [source]).sentences] == [False, False]


def test_singular_and_plural_of_short_words_match() -> None:
    """To the check, "file" and "files" are one word, as are "line"/"lines" and "make"/"makes"."""
    assert support_score("Lines of files make trouble.", "A line in a file makes trouble.") == 1.0


def test_a_restatement_ending_in_a_colon_is_not_completed_by_what_no_source_holds() -> None:
    """SmolLM2, asked which error open() fails with: the restatement, a colon, then a code block of
    invented Python. Joined, the restated words would carry the block past the threshold."""
    question = "What error does open() fail with if I pass O_CREAT and O_EXCL and the file is already there?"
    source = (
        "O_EXCL Ensure that this call creates the file: if this flag is specified in conjunction with "
        "O_CREAT, and pathname already exists, then open() fails with the error EEXIST."
    )
    answer = (
        "The error that open() fails with if I pass O_CREAT and O_EXCL is:\n```python\nos.error(OSError)\n```"
    )
    checked = check_answer(answer, [source], question=question)
    assert not checked.supported
    assert checked.sentences[0].text.endswith("is:") and not checked.sentences[0].claim
    right = check_answer(answer.split("\n")[0] + "\nEEXIST", [source], question=question)
    assert right.supported and len(right.sentences) == 1


ISSUE_5 = """issue(5)                      File Formats Manual                     issue(5)

NAME
       issue - prelogin message and identification file

DESCRIPTION
       /etc/issue is a text file which contains a message or system
       identification to be printed before the login prompt.  It may contain
       various @char and \\char sequences, if supported by the getty-type
       program employed on the system.

FILES
       /etc/issue

SEE ALSO
       motd(5), agetty(8), mingetty(8)
"""  # Debian's manpages package (Linux man-pages 6.03)


def test_a_claim_must_be_held_by_a_few_consecutive_sentences_not_words_from_all_over() -> None:
    """SmolLM2's wrong answer to "Which file holds the text printed before the login prompt?" took
    "motd" from the SEE ALSO list and the rest from DESCRIPTION: every word is in the page."""
    question = "Which file holds the text printed before the login prompt?"
    wrong = check_answer("The file /etc/motd contains the text printed before the login prompt.", [ISSUE_5],
                         question=question)  # fmt: skip
    assert not wrong.supported
    right = check_answer("The file /etc/issue contains the text printed before the login prompt [1].", [ISSUE_5],
                         question=question)  # fmt: skip
    assert right.supported and right.cited == [1]
    assert "/etc/issue is a text file" in right.sentences[0].span.text
    # a claim drawn from the name line and the description, three sentences in a row, still counts
    assert check_answer("The prelogin message file is printed before the login prompt.", [ISSUE_5]).supported


BASH_README_DEBIAN = (  # from Debian's /usr/share/doc/bash/README.Debian
    "Bash Configuration for Debian\n-----------------------------\n\n"
    "A number of patches for the bash sources is applied for the Debian build\nof bash.  "
    "See the details at the end of the file.\n\n"
    "The upstream ChangeLog can be found in the bash-doc package.\n\n"
    "   Starting with readline-4.2a, completion on symlinks that point\n   to directories does not "
    "append the slash. To restore the behaviour\n   found in readline-4.2, add to /etc/inputrc or ~/.inputrc:\n"
)


def test_a_path_is_one_term_not_the_words_it_is_made_of() -> None:
    # SmolLM2's answer to "Where is the bash Debian changelog kept?": the page holds "Debian" and
    # "ChangeLog" a sentence apart, but names no debian/changelogs
    invented = "The bash Debian changelog is kept in the `debian/changelogs` directory."
    assert citations.paths_in(invented) == {"debian/changelog"}
    assert citations.paths_in("Some tools (e.g. ls, i.e. the GNU one) in the U.S. use /bin.") == set()
    assert citations.support_score(invented, BASH_README_DEBIAN) == 0.0
    # a path the page names counts, with or without its leading slash, and a tail of a longer one
    assert citations.support_score("To restore the slash, add it to /etc/inputrc.", BASH_README_DEBIAN) >= 0.7
    assert citations.support_score("To restore the slash, add it to etc/inputrc.", BASH_README_DEBIAN) >= 0.7
    sshd = "Tunnelling is switched on in /etc/ssh/sshd_config with PermitTunnel."
    assert citations.support_score("Tunnelling is switched on in ssh/sshd_config.", sshd) >= 0.7
    assert citations.support_score("Tunnelling is switched on in /etc/sshd_config.", sshd) == 0.0
    checked = citations.check_answer(invented, [BASH_README_DEBIAN])
    assert not checked.supported


COREUTILS_README = (  # from GNU coreutils' README
    "If you can run the tests as root, please do so and report any\nproblems.\n\n\n"
    "***************\nReporting bugs:\n---------------\n\n"
    "Send bug reports, questions, comments, etc. to bug-coreutils@gnu.org.\n"
    "To suggest a patch, see the files README-hacking and HACKING for tips.\n\n"
    "If you have a problem with 'sort', try running 'sort --debug', as it\ncan often help find and fix problems.\n"
)
OPENSSH_README_TUN = (  # from OpenSSH's README.tun
    "Finally connect to the OpenSSH server to establish the tunnel by using\nthe following command:\n\n"
    "\tssh sshgateway\n\n"
    "It is also possible to tell the client to fork into the background after\n"
    "the connection has been successfully established:\n\n\tssh -f -w any sshgateway true\n"
)


def test_rules_and_heading_underlines_are_breaks_not_text() -> None:
    sentences = [COREUTILS_README[a:b] for a, b in citations.source_sentences(COREUTILS_README)]
    assert "Reporting bugs:" in sentences
    assert not any(set(s) <= set("*-\n ") for s in sentences)


@pytest.mark.parametrize(
    ("question", "source", "quoted"),
    [
        (
            "How do I establish the tunnel with OpenSSH?",
            OPENSSH_README_TUN,
            "Finally connect to the OpenSSH server to establish the tunnel by using the following "
            "command: ssh sshgateway",
        ),
        (
            "Where do I report bugs in coreutils?",
            COREUTILS_README,
            "Reporting bugs: Send bug reports, questions, comments, etc. to bug-coreutils@gnu.org. "
            "To suggest a patch, see the files README-hacking and HACKING for tips.",
        ),
    ],
)
def test_a_quoted_sentence_ending_in_a_colon_brings_what_it_introduces(question, source, quoted) -> None:
    best = citations.best_sentence_for(question, [source])
    assert " ".join(best.text.split()) == quoted
    assert source[best.start : best.end].rstrip().endswith(quoted.split()[-1])  # the offsets cover it


def test_what_a_colon_introduces_is_cut_at_whole_lines() -> None:
    source = "Run these:\n" + "".join(f"step {i} " * 8 + "\n" for i in range(20))
    span = citations.Span(1, 0, len("Run these:"), "Run these:", 1.0)
    longer = citations.with_what_it_introduces(span, source)
    block = source[len("Run these:\n") : longer.end]
    assert len(block) <= citations.LEAD_IN_LIMIT < len(block) + 58  # the next line would not fit
    assert longer.text.endswith("step 6 step 6") and source[longer.end] == " "  # whole lines
    plain = citations.Span(1, 0, 5, "Done.", 1.0)
    assert citations.with_what_it_introduces(plain, "Done. More text.") is plain


def test_an_answer_that_stops_at_its_colon_claims_nothing() -> None:
    # SmolLM2, asked which options Debian's bash was built with; the page says the same words
    source = BASH_README_DEBIAN.replace(
        "The upstream ChangeLog",
        "The bash package was built using the following configuration options:\n\n"
        "        --with-curses \\\n        --enable-largefile \\\n\nThe upstream ChangeLog",
    )
    question = "Which configuration options was the Debian bash package built with?"
    said = "The Debian bash package was built with the following configuration options:"
    checked = citations.check_answer(said, [source], question=question)
    assert checked.unfinished and not checked.claims and not checked.supported
    # the quote that replaces it brings what the page's own colon introduces
    best = citations.best_sentence_for(question, [source])
    assert "--with-curses" in best.text and "--enable-largefile" in best.text
    # a colon followed by what it introduces is an answer like any other
    done = citations.check_answer(
        said + "\n--with-curses and --enable-largefile.", [source], question=question
    )
    assert not done.unfinished and done.supported


def test_markers_before_a_colon_do_not_make_two_texts_differ() -> None:
    assert (
        citations.without_markers("It was built with these options [1]:")
        == "It was built with these options:"
    )
    assert citations.without_markers("Yes [2], it is [1].") == "Yes, it is."
