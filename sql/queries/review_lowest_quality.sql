-- Masks to review first: the 50 lowest quality scores (estimated mean Dice), with the
-- structure the score doubts most, group and CTR.
SELECT uid, group_name, model, ROUND(quality, 3) AS quality,
       ROUND(quality_heart, 3) AS q_heart, ROUND(quality_left_lung, 3) AS q_left_lung,
       ROUND(quality_right_lung, 3) AS q_right_lung, ROUND(ctr, 3) AS ctr, view
FROM label_results
ORDER BY quality ASC, uid
LIMIT 50;
