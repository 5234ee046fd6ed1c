-- Masks to review first: the 50 lowest quality scores (estimated mean Dice), with the
-- structure the score doubts most, group, CTR and the input check's verdict (quality 0:
-- the film does not read as a frontal chest radiograph).
SELECT uid, group_name, model, ROUND(CAST(quality AS NUMERIC), 3) AS quality,
       ROUND(CAST(quality_heart AS NUMERIC), 3) AS q_heart, ROUND(CAST(quality_left_lung AS NUMERIC), 3) AS q_left_lung,
       ROUND(CAST(quality_right_lung AS NUMERIC), 3) AS q_right_lung, ROUND(CAST(ctr AS NUMERIC), 3) AS ctr, view, input_check
FROM label_results
ORDER BY quality ASC, uid
LIMIT 50;
