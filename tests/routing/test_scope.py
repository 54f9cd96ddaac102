import pytest

from ptmoe_serve.routing.scope import check_scope, first_turn, routed_length


def test_turn_one_is_the_messages_through_the_first_user_message_when_more_follow():
    system, user = {"role": "system", "content": "s"}, {"role": "user", "content": "u"}
    answer, again = {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}
    assert first_turn([system, user, answer, again]) == [system, user]
    assert first_turn([user, answer, again]) == [user]
    assert first_turn([system, user]) is None  # turn 1 itself: routed on all of it
    assert first_turn([system, answer]) is None  # no user message


def test_turn_one_is_read_only_where_it_is_a_token_prefix_of_the_prompt():
    assert routed_length([1, 2, 3, 4, 5], [1, 2, 3]) == 3
    assert routed_length([1, 2, 3], [1, 2, 3]) == 3
    assert routed_length([1, 9, 3, 4], [1, 2, 3]) is None  # a template that rewrote turn 1
    assert routed_length([1, 2], [1, 2, 3]) is None
    assert routed_length([1, 2], []) is None


def test_a_scope_is_one_of_the_two():
    assert check_scope("first_turn", "x") == "first_turn"
    with pytest.raises(ValueError, match="route_scope must be one of 'prompt', 'first_turn'; "
                                         "got 'whole'"):
        check_scope("whole", "route_scope")
